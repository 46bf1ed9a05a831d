"""The contract-alert example: models, mappings, service and demo."""
