"""Adapters of the policy service: the only modules that import an SDK (here: opa-python-client)."""
