"""The ledger's adapters: the only modules of pilothouse.ledger that touch an SDK or the file system."""
