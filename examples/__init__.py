"""Examples of sa_dualwrite in use."""
