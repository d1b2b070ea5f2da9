"""Run the real console in-process for tests: web server (uvicorn) + read-model consumer (console principal) +
decision producer, exactly as ``python -m pilothouse.console`` wires them, on a free local port.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from pathlib import Path

import uvicorn
from argon2 import PasswordHasher
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pilothouse.bus import attestation

from pilothouse.bus.config import BusSettings
from pilothouse.bus.consumer import ConsumerLoop
from pilothouse.bus.producer import BusProducer
from pilothouse.console.auth import LocalAccounts
from pilothouse.console.config import ConsoleSettings
from pilothouse.console.domain import ReadModel
from pilothouse.console.handlers import build_handlers
from pilothouse.console.publish import BusDecisionSink
from pilothouse.console.web import Console

# Cheap argon2id parameters for test accounts; real hashes come from `pilothouse console hash-password`.
_fast = PasswordHasher(time_cost=1, memory_cost=4096, parallelism=1)

TEST_USERS = {  # id -> (display, roles)
    "alice": ("Alice Approver", ["approver"]),
    "bob": ("Bob Approver", ["approver"]),
    "rita": ("Rita Responder", ["responder"]),
    "ada": ("Ada Admin", ["admin", "responder"]),
}


# Each test person's own signing key; the console gets only the registry of public keys.
HUMAN_KEYS = {u: Ed25519PrivateKey.generate() for u in TEST_USERS}


def write_human_keys(directory: Path) -> Path:
    """Each person's key file (<dir>/humans/<id>.key, what they load into the browser) and the public registry."""
    import json

    for u, k in HUMAN_KEYS.items():
        attestation.write_human_key(key_file(directory, u), k)
    path = directory / "human-keys.json"
    path.write_text(json.dumps({"humans": {
        u: {"roles": TEST_USERS[u][1], "keys": [{"public_key": attestation.public_key_b64(k.public_key())}]}
        for u, k in HUMAN_KEYS.items()}}))
    return path


def key_file(directory: Path, user: str) -> Path:
    return directory / "humans" / f"{user}.key"


def password_of(user: str) -> str:
    return f"correct horse {user} battery"


def write_users_file(directory: Path) -> Path:
    import yaml

    path = directory / "users.yaml"
    users = [{"id": u, "display": d, "roles": r, "password_hash": _fast.hash(password_of(u))}
             for u, (d, r) in TEST_USERS.items()]
    path.write_text(yaml.safe_dump({"users": users}))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningConsole:
    """The console as a running service; ``url`` is where its web server listens."""

    def __init__(self, bus: BusSettings, users_file: Path, **settings_overrides):
        self.port = free_port()
        self.settings = ConsoleSettings(users_file=users_file, session_secret="t" * 48, port=self.port,
                                        secure_cookies=False, consumer_group=f"pilothouse.console.test-{uuid.uuid4().hex[:8]}",
                                        **settings_overrides)
        self.model = ReadModel()
        self.producer = BusProducer(bus)
        handlers, expected = build_handlers(self.model, self.settings.topics)
        self.loop = ConsumerLoop(bus, group_id=self.settings.consumer_group, handlers=handlers,
                                 dlq_producer=self.producer, expected_records=expected,
                                 auto_offset_reset=self.settings.auto_offset_reset)
        self.console = Console(self.settings, self.model, BusDecisionSink(self.producer, self.settings.output_topics),
                               LocalAccounts.from_file(users_file))
        self.server = uvicorn.Server(uvicorn.Config(self.console.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", timeout_graceful_shutdown=1))
        self.url = f"http://127.0.0.1:{self.port}"
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> RunningConsole:
        for target in (self.loop.run, self.server.run):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self._threads.append(t)
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("console web server did not start")
            time.sleep(0.05)
        return self

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "condition") -> None:
        """Wait until the read model satisfies ``predicate(model)`` (records travel through the real broker)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.model.lock:
                if predicate(self.model):
                    return
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    def __exit__(self, *exc) -> None:
        self.console.stopping.set()
        self.server.should_exit = True
        self.loop.stop()
        for t in self._threads:
            t.join(timeout=15)
        self.loop.close()
        self.producer.close()


def publish(bus_admin: BusSettings, records: list, producer: BusProducer | None = None) -> None:
    """Produce upstream records as the admin principal onto their catalogue topics, waiting for acks."""
    p = producer or BusProducer(bus_admin)
    deliveries = [p.produce(r, key=getattr(r, "action_id", None) or r.incident_id) for r in records]
    p.wait(deliveries)


def read_topic_until(bus_admin: BusSettings, topic: str, predicate, *, want: int = 1, timeout_s: float = 30.0) -> list:
    """Records of ``topic`` (read as admin from the beginning) matching ``predicate``; stops once ``want`` matched.

    A plain consumer, not the service ConsumerLoop: a test must never dead-letter someone else's record on a shared
    topic. Records that do not decode are skipped.
    """
    from confluent_kafka import Consumer  # tests may use the SDK directly; services go through the bus package

    from pilothouse.bus.errors import PermanentError
    from pilothouse.bus.serde import Serde

    serde = Serde()
    consumer = Consumer({**bus_admin.librdkafka(), "group.id": f"test.{uuid.uuid4().hex[:12]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    found: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(found) < want and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            try:
                record = serde.decode(msg.value()).record
            except PermanentError:
                continue
            if predicate(record):
                found.append(record)
    finally:
        consumer.close()
    return found
