"""Application services of the contract-alert example."""
