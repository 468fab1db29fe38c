"""The kit with a Confluent Schema Registry (the real one of SWITCHYARD_TEST_REGISTRY: Apicurio's Confluent
API, started by scripts/test_python.sh): the Prediction schema registered under the predictions topic's
subject and its id written; ModelRequests read by their writer's id, resolved to the kit's schema (a writer
one version ahead, with a field added; one behind, with a field removed); ids looked up once; cached ids
working while the registry is down and unseen ids then counted as undecodable; a refused schema (409) and
an unreachable registry stopping the start with the reason; and end to end with switchyard on the registry."""

import io
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter

import fastavro
import pytest

from conftest import REPO, WORKERS, latest_id, metric, register, registry_request, subject_path
from switchyard_worker import (Codec, DecodeError, IncompatibleSchema, RegistryUnreachable, SchemaRegistry, Worker,
                               load_config)
from switchyard_worker.codec import schema_text
from switchyard_worker.registry import without_logical_types
from test_end_to_end import assert_once, run_id, worker_metrics
from test_unit import FakeMessage, FakeProducer, model_request, run_batch, samples

FLAKY = os.path.join(WORKERS, "flaky_worker.py")
#: Nothing listens on the discard port: connections are refused at once.
UNREACHABLE = "http://127.0.0.1:9/apis/ccompat/v7"


def prefix(name):
    return f"pykit-{name}-{random.randrange(16 ** 8):08x}"


def evolved(fields_to_add=(), fields_to_drop=()):
    """The bundled ModelRequest schema's text with fields appended and/or removed."""
    schema = json.loads(schema_text("ModelRequest"))
    schema["fields"] = [f for f in schema["fields"] if f["name"] not in fields_to_drop] + list(fields_to_add)
    return json.dumps(schema)


CHANNEL = {"name": "channel", "type": "string", "default": "web", "doc": "where the request came from"}


def framed(schema_id, schema_json, record):
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(without_logical_types(json.loads(schema_json))), record)
    return b"\x00" + schema_id.to_bytes(4, "big") + out.getvalue()


def test_registry_settings_and_the_password():
    env = {"SWITCHYARD__CODEC__FRAMING": "confluent", "SWITCHYARD__CODEC__REGISTRY_URL": " http://r:8081/ ",
           "SWITCHYARD__CODEC__REGISTRY_USERNAME": "svc", "SWITCHYARD__CODEC__REGISTRY_PASSWORD": "s3cr3t-pw",
           "SWITCHYARD__CODEC__REGISTRY_WAIT_MS": "1500"}
    c = load_config("m", env)
    assert (c.registry_url, c.registry_username, c.registry_password, c.registry_wait_ms) == \
        ("http://r:8081/", "svc", "s3cr3t-pw", 1500)
    assert "s3cr3t-pw" not in repr(c)
    codec = Codec.from_config(c)
    assert codec.registry is not None and codec.prediction_schema_id is None
    assert "s3cr3t-pw" not in repr(codec.registry) and "<hidden>" in repr(codec.registry)
    with pytest.raises(ValueError, match="register it first"):
        codec.encode_prediction({"request_id": "r", "model": "m", "output": None, "error": None, "produced_at": 1})
    with pytest.raises(ValueError, match="needs codec framing"):
        load_config("m", {"SWITCHYARD__CODEC__REGISTRY_URL": "http://r:8081"})
    with pytest.raises(ValueError, match="must start with http"):
        load_config("m", {"SWITCHYARD__CODEC__FRAMING": "confluent", "SWITCHYARD__CODEC__REGISTRY_URL": "r:8081"})
    with pytest.raises(ValueError, match="must not hold credentials"):
        load_config("m", {"SWITCHYARD__CODEC__FRAMING": "confluent",
                          "SWITCHYARD__CODEC__REGISTRY_URL": "http://u:p@r:8081"})
    # No registry: the fixed ids, as before.
    assert Codec.from_config(load_config("m", {"SWITCHYARD__CODEC__FRAMING": "confluent"})).registry is None


def test_an_unreachable_registry_fails_lookups_fast_after_the_first():
    registry = SchemaRegistry(UNREACHABLE)
    codec = Codec("confluent", registry=registry)
    with pytest.raises(DecodeError, match=r"schema id 7: schema registry http://127.0.0.1:9/\S* is unreachable"):
        codec.decode_model_request(b"\x00\x00\x00\x00\x07" + b"x" * 20)
    made = registry.requests_made
    started = time.monotonic()
    with pytest.raises(DecodeError, match="schema id 8: .* not retried yet"):
        codec.decode_model_request(b"\x00\x00\x00\x00\x08" + b"x" * 20)
    assert time.monotonic() - started < 0.05 and registry.requests_made == made
    started = time.monotonic()
    with pytest.raises(RegistryUnreachable, match="unreachable"):
        registry.register("s-value", "Prediction", schema_text("Prediction"), wait_s=1.0)
    assert time.monotonic() - started >= 1.0


def test_evolved_writer_schemas_are_read_through_the_registry(registry):
    """ModelRequests written with a schema one version ahead (a field with a default appended) and one
    behind (a field with a default removed), each registered under a subject (new ids): read by their
    writer's schema and resolved to the kit's, each id looked up once."""
    p = prefix("evolve")
    subject = f"{p}.model.evo.requests-value"
    own_id = register(subject, schema_text("ModelRequest"))
    ahead_id = register(f"{p}.ahead-value", evolved(fields_to_add=[CHANNEL]))
    behind_id = register(f"{p}.behind-value", evolved(fields_to_drop=["attributes"]))
    assert len({own_id, ahead_id, behind_id}) == 3, (own_id, ahead_id, behind_id)

    client = SchemaRegistry(registry)
    codec = Codec("confluent", registry=client)
    request = model_request(1, attributes={"country": "DE"})
    ahead = framed(ahead_id, evolved(fields_to_add=[CHANNEL]), dict(request, channel="mobile"))
    behind = framed(behind_id, evolved(fields_to_drop=["attributes"]), request)
    own = Codec("confluent", model_request_schema_id=own_id).encode_model_request(request)

    assert codec.decode_model_request(ahead) == request            # "channel" skipped
    assert codec.decode_model_request(behind) == dict(request, attributes={})   # the reader's default
    assert codec.decode_model_request(own) == request
    assert client.requests_made == 3
    for _ in range(5):
        assert codec.decode_model_request(ahead) == request
        assert codec.decode_model_request(own) == request
    assert client.requests_made == 3, "an id was looked up more than once"

    # A record of another schema (a Prediction on the requests topic) does not resolve; an id the registry
    # does not have is not readable; neither is a truncated body.
    prediction_id = register(f"{p}.model.evo.predictions-value", schema_text("Prediction"))
    wrong = framed(prediction_id, schema_text("Prediction"),
                   {"request_id": "r", "model": "m", "output": None, "error": None, "produced_at": 1})
    with pytest.raises(DecodeError, match="resolved to switchyard.ModelRequest"):
        codec.decode_model_request(wrong)
    with pytest.raises(DecodeError, match="schema id 2147483000 is not in the schema registry"):
        codec.decode_model_request(b"\x00" + (2147483000).to_bytes(4, "big") + ahead[5:])
    with pytest.raises(DecodeError, match="not Avro"):
        codec.decode_model_request(ahead[:-12])


def test_a_batch_through_the_loop_with_the_registry(registry, caplog):
    """The worker registers the Prediction schema under its predictions topic's subject and writes that
    id; it answers requests of switchyard's schema and of a newer writer; while the registry is down the
    cached ids keep working and a record of an id never seen is logged with the reason, counted as
    undecodable and skipped (its offset committed, as switchyard dead-letters it)."""
    p = prefix("loop")
    worker = Worker("m", lambda r: f"{r['request_id']}:{r['attributes'].get('country', '-')}", metrics_port=-1,
                    framing="confluent", registry_url=registry, registry_wait_ms=5000,
                    model_predictions=f"{p}.model.{{model}}.predictions")
    with caplog.at_level("INFO", logger="switchyard_worker"):
        worker.register_schemas()
    subject = f"{p}.model.m.predictions-value"
    prediction_id = latest_id(subject)
    assert worker.codec.prediction_schema_id == prediction_id
    assert f"registered under subject {subject}: id {prediction_id}" in caplog.text
    status, answer = registry_request("GET", f"/schemas/ids/{prediction_id}")
    assert status == 200 and answer["schema"] == schema_text("Prediction"), "not the bundled text, trimmed"

    own_id = register(f"{p}.model.{{model}}.requests-value", schema_text("ModelRequest"))
    ahead_id = register(f"{p}.ahead-value", evolved(fields_to_add=[CHANNEL]))
    writer = Codec("confluent", model_request_schema_id=own_id)
    msgs = [FakeMessage(0, 10 + i, f"user-{i}".encode(), writer.encode_model_request(model_request(i)))
            for i in range(3)]
    msgs += [FakeMessage(1, 20 + i, f"user-{i}".encode(),
                         framed(ahead_id, evolved(fields_to_add=[CHANNEL]),
                                dict(model_request(i, attributes={"country": "FR"}), channel="app")))
             for i in range(3, 6)]
    reader = Codec("confluent", registry=SchemaRegistry(registry))
    producer, consumer = run_batch(worker, msgs, FakeProducer(codec=reader))
    assert [(k, r["request_id"], r["output"]) for _, k, r in producer.delivered] == \
        [(f"user-{i}".encode(), f"req-{i}", f"req-{i}:{'-' if i < 3 else 'FR'}".encode()) for i in range(6)]
    assert consumer.commits == [([(0, 13), (1, 26)], 6)]

    # The registry goes away: cached ids are read, an id never seen cannot be.
    worker.codec.registry.url = UNREACHABLE
    newer_id = register(f"{p}.newer-value", evolved(fields_to_add=[CHANNEL, dict(CHANNEL, name="tier")]))
    newer = framed(newer_id, evolved(fields_to_add=[CHANNEL, dict(CHANNEL, name="tier")]),
                   dict(model_request(9), channel="x", tier="gold"))
    msgs = [FakeMessage(0, 13, b"user-7", writer.encode_model_request(model_request(7))),
            FakeMessage(0, 14, b"user-9", newer),
            FakeMessage(1, 26, b"user-3", msgs[3].value())]
    with caplog.at_level("WARNING", logger="switchyard_worker"):
        producer, consumer = run_batch(worker, msgs, FakeProducer(codec=reader))
    assert [r["request_id"] for _, _, r in producer.delivered] == ["req-7", "req-3"]
    assert consumer.commits == [([(0, 15), (1, 27)], 2)]
    assert samples(worker)["switchyard_worker_undecodable_total"] == 1
    assert f"offset 14): schema id {newer_id}: schema registry {UNREACHABLE} is unreachable" in caplog.text


def start_worker(env, timeout=60):
    """flaky_worker.py with `env` over the current environment; (exit code, output, seconds taken)."""
    started = time.monotonic()
    out = subprocess.run([sys.executable, FLAKY, "--model", "m"], env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=timeout, cwd=REPO)
    return out.returncode, out.stdout + out.stderr, time.monotonic() - started


def test_an_unreachable_registry_stops_the_start_after_the_wait():
    code, output, took = start_worker({
        "SWITCHYARD__CODEC__FRAMING": "confluent", "SWITCHYARD__CODEC__REGISTRY_URL": UNREACHABLE,
        "SWITCHYARD__CODEC__REGISTRY_WAIT_MS": "1500", "SWITCHYARD__CODEC__REGISTRY_USERNAME": "svc",
        "SWITCHYARD__CODEC__REGISTRY_PASSWORD": "s3cr3t-pw",
        # Nothing of Kafka is started before the schema is registered.
        "SWITCHYARD_BOOTSTRAP_SERVERS": "127.0.0.1:1", "SWITCHYARD_WORKER_METRICS_PORT": "-1"})
    assert code == 1, output
    assert took >= 1.5, f"gave up after {took:.1f} s"
    assert f"model m cannot start: schema registry {UNREACHABLE} is unreachable" in output, output
    assert "registering model.m.predictions-value again" in output, output
    assert "s3cr3t-pw" not in output
    assert "answering" not in output


def test_a_refused_schema_stops_the_start_with_the_registrys_message(registry):
    """Someone else's Prediction owns the subject, whose compatibility rule only takes schemas that read
    what was written before: the worker refuses to start, naming the subject and the registry's reason."""
    p = prefix("refused")
    subject = f"{p}.model.m.predictions-value"
    register(subject, '{"type":"record","name":"Prediction","namespace":"other",'
                      '"fields":[{"name":"request_id","type":"long"}]}')
    status, _ = registry_request("PUT", f"/config/{subject}", {"compatibility": "BACKWARD"})
    assert status == 200
    # What the registry says to the kit's schema.
    status, refusal = registry_request("POST", f"{subject_path(subject)}/versions",
                                       {"schema": schema_text("Prediction")})
    assert status == 409, refusal
    code, output, _ = start_worker({
        "SWITCHYARD__CODEC__FRAMING": "confluent", "SWITCHYARD__CODEC__REGISTRY_URL": registry,
        "SWITCHYARD__TOPICS__MODEL_PREDICTIONS": f"{p}.model.{{model}}.predictions",
        "SWITCHYARD_BOOTSTRAP_SERVERS": "127.0.0.1:1", "SWITCHYARD_WORKER_METRICS_PORT": "-1"})
    assert code == 1, output
    assert f"under subject {subject!r} as incompatible" in output, output
    # The registry's own words (Apicurio lists the differences in no fixed order: compare pieces).
    assert refusal["message"].split(",")[0] in output, (refusal, output)
    assert "reader type: STRING not compatible with writer type: LONG" in refusal["message"]
    assert "reader type: STRING not compatible with writer type: LONG" in output, output
    assert "answering" not in output
    with pytest.raises(IncompatibleSchema) as refused:
        Worker("m", lambda r: "", metrics_port=-1, framing="confluent", registry_url=registry,
               model_predictions=f"{p}.model.{{model}}.predictions").run()
    assert refused.value.subject == subject and refused.value.message.split(",")[0] == refusal["message"].split(",")[0]


def raw_values(stack, topic, want, limit_s=30):
    consumer = stack.consumer()
    consumer.subscribe([topic])
    values, deadline = [], time.time() + limit_s
    try:
        while len(values) < want and time.time() < deadline:
            values += [m.value() for m in consumer.consume(500, 0.5) if not m.error()]
    finally:
        consumer.close()
    return values


def test_canary_with_switchyard_and_the_kit_on_the_registry(make_stack, registry):
    """switchyard (confluent framing, registry) with a 40% canary whose candidate is a kit worker on the
    same registry: every request decided once and OK, the candidate's outputs are the worker's, the
    predictions it wrote carry the id registered under its predictions topic's subject (the same schema
    text as switchyard's, so the same id as switchyard's pattern subject), and nothing was dead-lettered."""
    s = make_stack("registry", framing="confluent", registry=registry)
    control, candidate, deployment, percent = "reg-ctl", "reg-py", "reg", 40
    s.demo_model(control)
    # Fixed ids no registry gives out yet: with a registry they must not be used (neither written nor expected).
    worker = s.python_worker("registry", FLAKY, "--model", candidate,
                             env={"SWITCHYARD__CODEC__SCHEMA_IDS__MODEL_REQUEST": "99998",
                                  "SWITCHYARD__CODEC__SCHEMA_IDS__PREDICTION": "99999"})
    s.cli("deploy", deployment, "--strategy", "canary", "--control", control, "--candidate", candidate,
          "--canary-percent", str(percent), "--timeout-ms", "20000")
    rid, count = run_id(), 600
    s.loadgen(deployment, count, rate=400, users=200, run_id=rid)

    decisions = s.decisions(rid, count)      # framed with the id of the decisions topic's subject
    assert_once(decisions, rid, count)
    assert Counter(d["status"] for d in decisions) == {"OK": count}
    by_model = Counter(d["model"] for d in decisions)
    assert set(by_model) == {control, candidate} and by_model[candidate] > 0.2 * count, by_model
    for d in decisions:
        if d["model"] == candidate:
            assert d["cohort"] == "candidate" and d["output"] == f"n={d['request_id'].rsplit('-', 1)[1]}".encode(), d

    subject = f"{s.topic('MODEL_PREDICTIONS', candidate)}-value"
    prediction_id = latest_id(subject)
    assert f"registered under subject {subject}: id {prediction_id}" in worker.log()
    assert prediction_id == s.schema_id("Prediction"), "not the text switchyard registers"
    predictions = raw_values(s, s.topic("MODEL_PREDICTIONS", candidate), by_model[candidate])
    assert len(predictions) == by_model[candidate]
    assert {v[:5] for v in predictions} == {b"\x00" + prediction_id.to_bytes(4, "big")}
    # The requests the worker read carried switchyard's ModelRequest id (not one the kit registered).
    requests = raw_values(s, s.topic("MODEL_REQUESTS", candidate), by_model[candidate])
    assert {v[:5] for v in requests} == {b"\x00" + s.schema_id("ModelRequest").to_bytes(4, "big")}
    m = worker_metrics(worker)
    assert metric(m, "switchyard_worker_requests_total", model=candidate) == by_model[candidate]
    assert metric(m, "switchyard_worker_undecodable_total", model=candidate) == 0
    sy = s.switchyard_metrics()
    assert metric(sy, "switchyard_dead_letters_total") == 0
    assert metric(sy, "switchyard_decisions_total", deployment=deployment, model=candidate, status="OK") == \
        by_model[candidate]
