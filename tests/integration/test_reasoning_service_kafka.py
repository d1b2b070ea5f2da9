"""The reasoning service as a process (``python -m pilothouse.reasoning``) on the real broker, configured only
through its environment, with a scripted model: incidents in → hypotheses + proposals out (read_committed), stale
versions skipped, unredacted records refused for the model, poison pills dead-lettered, SIGTERM exits 0.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path


from pilothouse.bus.producer import BusProducer
from pilothouse.bus.records import HypothesisValidated
from pilothouse.bus.serde import Serde
from tests.kafka_reading import read_all
from tests.unit.test_reasoning_grounding import NOW, ScriptedModel, incident, lying_answer

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_service_process_end_to_end(stack_info, bus_settings, new_topic, tmp_path) -> None:
    s = bus_settings()
    inc_t, val_t, hyp_t, prop_t = new_topic(), new_topic(), new_topic(), new_topic()
    with ScriptedModel() as model:
        base = incident(1)
        model.script = [("json", lying_answer(base))]
        env = {
            **os.environ,
            "PILOTHOUSE_KAFKA_BOOTSTRAP_SERVERS": stack_info.kafka.bootstrap_servers,
            "PILOTHOUSE_KAFKA_USERNAME": "admin", "PILOTHOUSE_KAFKA_PASSWORD": stack_info.password("admin"),
            "PILOTHOUSE_KAFKA_SECURITY_PROTOCOL": stack_info.kafka.security_protocol,
            "PILOTHOUSE_KAFKA_SASL_MECHANISM": stack_info.kafka.sasl_mechanism,
            "PILOTHOUSE_REASONING_TOPIC_INCIDENTS": inc_t, "PILOTHOUSE_REASONING_TOPIC_VALIDATIONS": val_t,
            "PILOTHOUSE_REASONING_TOPIC_HYPOTHESES": hyp_t, "PILOTHOUSE_REASONING_TOPIC_PROPOSALS": prop_t,
            "PILOTHOUSE_REASONING_GROUP_ID": f"test.{uuid.uuid4().hex[:8]}",
            "PILOTHOUSE_REASONING_TRANSACTIONAL_ID": f"test.{uuid.uuid4().hex[:8]}",
            "PILOTHOUSE_REASONING_OBSERVABILITY_PORT": str(free_port()),
            "PILOTHOUSE_REASONING_MAX_LLM_HYPOTHESES": "3",
            "PILOTHOUSE_LLM_BASE_URL": model.url, "PILOTHOUSE_LLM_MODEL": "scripted-1",
            "PILOTHOUSE_LLM_TIMEOUT_S": "5",
        }
        producer = BusProducer(s)
        unredacted = incident(1, scanned=False).model_copy(update={"incident_id": "inc-99", "event_id": "e-99"})
        records = [incident(1), incident(2), incident(1), unredacted]  # the third is stale
        producer.wait([producer.produce(r, key=r.incident_id, topic=inc_t) for r in records])
        producer.wait([producer.produce_bytes(inc_t, b"not avro", key=b"inc-42")])
        v = HypothesisValidated(event_id="v1", incident_id="inc-42", correlation_id="inc-42", occurred_at=NOW,
                                hypothesis_id="hyp-x", verdict="rejected", validator_id="oncall-1")
        producer.wait([producer.produce(v, key="inc-42", topic=val_t)])

        log = (tmp_path / "reasoning.log").open("w")
        proc = subprocess.Popen([sys.executable, "-m", "pilothouse.reasoning"], env=env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            hyps = read_all(s, hyp_t, expect=3, timeout_s=60, linger_s=2)
            props = read_all(s, prop_t, expect=1, timeout_s=60, linger_s=2)
            dlq = read_all(s, inc_t + ".dlq", expect=1, timeout_s=20, linger_s=2)
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(60)
            log.close()
    out = (tmp_path / "reasoning.log").read_text()
    assert rc == 0, out[-3000:]
    serde = Serde()
    got = [serde.decode(m.value()).record for m in hyps]
    assert sorted((h.incident_id, h.incident_version, h.llm_status) for h in got) == [
        ("inc-42", 1, "ok"), ("inc-42", 2, "ok"), ("inc-99", 1, "refused_unredacted")]
    assert len(model.requests) == 2  # the stale version and the unredacted record never reached the model
    known = {e.evidence_id for e in base.evidence}
    for h in got:
        assert h.hypotheses and h.hypotheses[0].root_cause_service == "emailservice"
        assert all(c.verified and set(c.evidence_ids) <= known for x in h.hypotheses for c in x.claims)
    assert any("delete_cluster" in d for h in got for d in h.dropped_proposals)
    actions = [serde.decode(m.value()).record for m in props]
    assert actions and all(a.action_type in {"scale_replicas", "collect_diagnostics", "restart_service",
                                             "rollback_deploy", "toggle_feature_flag"} for a in actions)
    ids = {x.hypothesis_id for h in got for x in h.hypotheses}
    assert all(a.hypothesis_id in ids for a in actions)
    assert len(dlq) == 1 and dict(dlq[0].headers())["pilothouse.dlq.original_topic"].decode() == inc_t
