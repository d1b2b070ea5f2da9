"""The actuator's adapters: the only modules that import an SDK (psycopg, httpx)."""
