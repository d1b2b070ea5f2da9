"""The sandbox fleet: a simulated Online-Boutique-shaped microservice system that Prometheus can scrape and the
actuator can act on (faults, actions with dry-run and idempotency keys, shadow prediction)."""
