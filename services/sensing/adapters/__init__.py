"""Adapters of the sensing service: the only modules that import an SDK or speak a protocol (Prometheus HTTP API)."""
