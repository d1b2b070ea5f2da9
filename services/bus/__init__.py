"""The event bus: the only package that talks to Kafka and Avro.

* :mod:`.catalogue` — every topic, its record, owners and layout (``catalogue.yaml``)
* :mod:`.schemas` / :mod:`.records` — the Avro schemas in ``schemas/`` and their generated pydantic twins
* :mod:`.serde` — Avro single-object encoding (or the Confluent wire format with a registry), bounded decoding
* :mod:`.producer` / :mod:`.consumer` / :mod:`.transactions` — typed producer, consumer loop with DLQ, exactly-once
* :mod:`.admin` — topics, SCRAM users and ACLs from the catalogue
* :mod:`.runtime` — JSON logs, /metrics and /health, SIGTERM handling for every service process
"""
