"""The pure parts of the kit, without a broker: Kafka's murmur2 partitioner, the Avro codec in both
framings, configuration, and one batch through the worker loop with a fake consumer and producer."""

import importlib.util
import io
import json
import os
import random

import fastavro
import pytest
from confluent_kafka import KafkaError

from conftest import REPO
from switchyard_worker import Codec, DecodeError, Worker, kafka_partition, load_config, murmur2, output_bytes
from switchyard_worker.codec import SCHEMA_DIR

# Kafka's own vectors: clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java (testMurmur2).
KAFKA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}
# Utils.murmur2 of short keys, as quoted by Akka's Murmur2Spec (every tail length 1-3, and 4 and 5 bytes).
AKKA_VECTORS = {b"1": -1993445489, b"12": 126087238, b"123": -267702483, b"1234": -1614185708, b"12345": -1188365604}


def load_faults():
    spec = importlib.util.spec_from_file_location("faults", os.path.join(REPO, "scripts", "faults", "faults.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_murmur2_matches_kafka_vectors():
    for key, expected in {**KAFKA_VECTORS, **AKKA_VECTORS}.items():
        assert murmur2(key) == expected, key
    # Utils.toPositive(murmur2) % n
    assert kafka_partition(b"21", 4) == (-973932308 & 0x7FFFFFFF) % 4


def test_partition_matches_the_fault_suite_function():
    faults = load_faults()
    rng = random.Random(7)
    for _ in range(3000):
        key = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
        partitions = rng.choice([1, 3, 4, 7, 12, 64, 1000])
        assert kafka_partition(key, partitions) == faults.murmur2_partition(key, partitions), (key, partitions)


def test_bundled_schemas_are_the_repositorys():
    for name in ("ModelRequest", "Prediction"):
        with open(os.path.join(SCHEMA_DIR, f"{name}.avsc")) as a, open(os.path.join(REPO, "schemas", f"{name}.avsc")) as b:
            assert json.load(a) == json.load(b), f"python/switchyard-worker's {name}.avsc differs from schemas/"


def model_request(i=0, **changes):
    record = {"request_id": f"req-{i}", "user_id": f"user-{i}", "deployment": "d", "sent_at": 1_700_000_000_000 + i,
              "payload": json.dumps({"amount": 10 * i, "n": i}).encode(), "attributes": {"source": "loadgen"},
              "model": "m", "role": "PRIMARY", "config_version": 3, "routed_at": 1_700_000_000_005 + i}
    record.update(changes)
    return record


def repo_decode(name, data):
    with open(os.path.join(REPO, "schemas", f"{name}.avsc")) as f:
        return fastavro.schemaless_reader(io.BytesIO(data), fastavro.parse_schema(json.load(f)))


def test_codec_round_trips_in_both_framings():
    plain, framed = Codec("plain"), Codec("confluent", model_request_schema_id=12, prediction_schema_id=13)
    request = model_request(5, role="SHADOW", attributes={})
    body = plain.encode_model_request(request)
    assert plain.decode_model_request(body) == request
    assert framed.encode_model_request(request) == b"\x00\x00\x00\x00\x0c" + body
    assert framed.decode_model_request(b"\x00\x00\x00\x00\x0c" + body) == request
    # Timestamps are plain ints, and the bytes are the repository schema's (which has timestamp-millis).
    assert repo_decode("ModelRequest", body)["routed_at"].timestamp() == request["routed_at"] / 1000

    for prediction in ({"request_id": "r", "model": "m", "output": b"0.5", "error": None, "produced_at": 1},
                       {"request_id": "r", "model": "m", "output": None, "error": "ValueError: x", "produced_at": 2}):
        data = plain.encode_prediction(prediction)
        assert plain.decode_prediction(data) == prediction
        assert repo_decode("Prediction", data)["error"] == prediction["error"]
        assert framed.encode_prediction(prediction) == b"\x00\x00\x00\x00\x0d" + data


def test_codec_refuses_what_is_not_a_model_request():
    plain, framed = Codec("plain"), Codec("confluent")
    good = plain.encode_model_request(model_request())
    for data, reason in [(b"", "empty"), (b"\x00\x01garbage", "not Avro"), (b'{"not": "avro"}', "not Avro"),
                         (good + b"\x00", "1 trailing bytes"), (good[:-3], "not Avro")]:
        with pytest.raises(DecodeError, match=reason):
            plain.decode_model_request(data)
    for data, reason in [(good, "magic byte is"), (b"\x00\x00\x00", "shorter than the 5-byte"),
                         (b"\x00\x00\x00\x00\x03" + good, "schema id 3, expected 2")]:
        with pytest.raises(DecodeError, match=reason):
            framed.decode_model_request(data)


def test_output_bytes():
    assert output_bytes("0.73") == b"0.73"
    assert output_bytes("façade") == "façade".encode()
    assert output_bytes(b"\x00\xff") == b"\x00\xff"
    assert output_bytes(0.8731) == b"0.8731"
    assert output_bytes(1) == b"1"
    assert output_bytes({"eta": 12.5}) == b'{"eta":12.5}'
    assert output_bytes([1, 2]) == b"[1,2]"
    for bad in (None, True, object()):
        with pytest.raises(TypeError):
            output_bytes(bad)
    np = pytest.importorskip("numpy")
    assert output_bytes(np.float64(0.25)) == b"0.25"


def test_config_from_environment_and_file(tmp_path):
    toml = tmp_path / "switchyard.toml"
    toml.write_text('[kafka]\nbootstrap_servers = "file:9092"\n[kafka.options]\n"security.protocol" = "SSL"\n'
                    '[topics]\nmodel_requests = "in.{model}"\npartitions = 6\n'
                    '[codec]\nframing = "confluent"\n[codec.schema_ids]\nmodel_request = 22\nprediction = 23\n')
    c = load_config("churn-v2", {"SWITCHYARD_CONFIG": str(toml)})
    assert (c.bootstrap_servers, c.requests_topic, c.predictions_topic, c.partitions) == \
        ("file:9092", "in.churn-v2", "model.churn-v2.predictions", 6)
    assert (c.framing, c.model_request_schema_id, c.prediction_schema_id) == ("confluent", 22, 23)
    assert c.kafka_options == {"security.protocol": "SSL"}
    assert c.group == "switchyard-model-churn-v2"

    env = {"SWITCHYARD_CONFIG": str(toml), "SWITCHYARD_BOOTSTRAP_SERVERS": "env:9092",
           "SWITCHYARD__TOPICS__MODEL_PREDICTIONS": "p.{model}.out", "SWITCHYARD__TOPICS__CREATE": "false",
           "SWITCHYARD__SERVICE__GROUP_ID": "\"team\"", "SWITCHYARD__CODEC__FRAMING": "plain",
           "SWITCHYARD_KAFKA_SASL_MECHANISMS": "SCRAM-SHA-512", "SWITCHYARD_WORKER_BATCH_SIZE": "64",
           "SWITCHYARD_WORKER_METRICS_PORT": "0"}
    c = load_config("churn-v2", env)
    assert (c.bootstrap_servers, c.predictions_topic, c.create_topics, c.group, c.framing) == \
        ("env:9092", "p.churn-v2.out", False, "team-model-churn-v2", "plain")
    assert c.kafka_options == {"security.protocol": "SSL", "sasl.mechanisms": "SCRAM-SHA-512"}
    assert (c.batch_size, c.metrics_port) == (64, 0)
    # Keyword arguments win over both.
    c = load_config("churn-v2", env, batch_size=8, consumer_group="mine", kafka_options={"client.id": "x"})
    assert (c.batch_size, c.group) == (8, "mine")
    assert c.kafka_options["client.id"] == "x" and c.kafka_options["sasl.mechanisms"] == "SCRAM-SHA-512"


def test_config_refuses_managed_options_and_bad_values():
    with pytest.raises(ValueError, match="group.id"):
        load_config("m", {"SWITCHYARD_KAFKA_GROUP_ID": "x"})
    with pytest.raises(ValueError, match="partitioner"):
        load_config("m", {}, kafka_options={"partitioner": "consistent"})
    with pytest.raises(ValueError, match="model name"):
        load_config("bad/name", {})
    with pytest.raises(ValueError, match="framing"):
        load_config("m", {"SWITCHYARD__CODEC__FRAMING": "json"})
    with pytest.raises(TypeError, match="unknown worker settings: batchsize"):
        load_config("m", {}, batchsize=3)


def test_client_settings():
    w = Worker("m", lambda r: "", bootstrap_servers="b:1", metrics_port=-1, kafka_options={"linger.ms": "5"})
    consumer, producer = w._consumer_settings(), w._producer_settings()
    assert consumer["isolation.level"] == "read_committed"
    assert consumer["enable.auto.commit"] is False and consumer["group.id"] == "switchyard-model-m"
    assert producer["partitioner"] == "murmur2_random"
    assert producer["linger.ms"] == "5" and producer["bootstrap.servers"] == "b:1"


# One batch through the loop, with fakes ------------------------------------------------------------------

class FakeMessage:
    def __init__(self, partition, offset, key, value):
        self._p, self._o, self._k, self._v = partition, offset, key, value

    def topic(self):
        return "model.m.requests"

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def key(self):
        return self._k

    def value(self):
        return self._v

    def error(self):
        return None


class FakeProducer:
    """Takes records; `refuse` maps request_id -> error codes to deliver for its first attempts."""

    def __init__(self, refuse=None, codec=None):
        self.refuse = {k: list(v) for k, v in (refuse or {}).items()}
        self.codec = codec or Codec()
        self.queued, self.delivered, self.attempts = [], [], []

    def produce(self, topic, key, value, on_delivery):
        self.queued.append((topic, key, value, on_delivery))

    def poll(self, timeout):
        return 0

    def flush(self, timeout):
        for topic, key, value, callback in self.queued:
            record = self.codec.decode_prediction(value)
            self.attempts.append(record["request_id"])
            codes = self.refuse.get(record["request_id"])
            if codes:
                callback(KafkaError(codes.pop(0)), None)
            else:
                self.delivered.append((topic, key, record))
                callback(None, None)
        self.queued = []
        return 0


class FakeConsumer:
    def __init__(self, producer):
        self.producer = producer
        self.commits = []

    def commit(self, offsets, asynchronous):
        assert not asynchronous
        # Offsets are committed only once every answer of the batch is in Kafka.
        assert not self.producer.queued
        self.commits.append((sorted((tp.partition, tp.offset) for tp in offsets), len(self.producer.delivered)))


def batch(n, partitions=2, extra=()):
    codec = Codec()
    msgs = [FakeMessage(i % partitions, 100 + i, f"user-{i}".encode(), codec.encode_model_request(model_request(i)))
            for i in range(n)]
    return msgs + list(extra)


def run_batch(worker, msgs, producer=None):
    producer = producer or FakeProducer()
    consumer = FakeConsumer(producer)
    assert worker._handle(msgs, consumer, producer)
    return producer, consumer


def samples(worker):
    return {s.name: s.value for metric in worker.metrics.registry.collect() for s in metric.samples
            if not s.name.endswith("_created") and s.labels.get("le") in (None,)}


def test_a_batch_is_answered_with_the_request_keys_then_committed():
    def predict(request):
        n = json.loads(request["payload"])["n"]
        if n == 3:
            raise KeyError("amount")
        if n == 4:
            return None
        request["routed_at"] = 0      # the function may change its request; the worker does not care
        return n / 10

    worker = Worker("m", predict, metrics_port=-1)
    garbage = FakeMessage(1, 99, b"user-x", b"\x00\x01garbage")
    producer, consumer = run_batch(worker, batch(6, extra=[garbage]))
    assert [(t, k, r["request_id"]) for t, k, r in producer.delivered] == \
        [("model.m.predictions", f"user-{i}".encode(), f"req-{i}") for i in range(6)]
    by_id = {r["request_id"]: r for _, _, r in producer.delivered}
    assert by_id["req-2"]["output"] == b"0.2" and by_id["req-2"]["error"] is None and by_id["req-2"]["model"] == "m"
    assert by_id["req-3"] == dict(by_id["req-3"], output=None, error="KeyError: 'amount'")
    assert by_id["req-4"]["output"] is None and by_id["req-4"]["error"].startswith("TypeError: the model function returned NoneType")
    # Offsets: past the last record of each partition, the undecodable one included.
    assert consumer.commits == [([(0, 105), (1, 106)], 6)]
    s = samples(worker)
    assert s["switchyard_worker_requests_total"] == 6
    assert s["switchyard_worker_errors_total"] == 2
    assert s["switchyard_worker_undecodable_total"] == 1
    assert s["switchyard_worker_batch_size_sum"] == 6 and s["switchyard_worker_batch_size_count"] == 1
    assert s["switchyard_worker_latency_seconds_count"] == 6


def test_a_failing_batch_function_fails_only_the_bad_requests():
    calls = []

    def predict_batch(requests):
        calls.append(len(requests))
        ns = [json.loads(r["payload"])["n"] for r in requests]
        if 2 in ns:
            raise RuntimeError("cannot score n=2")
        return [ValueError("odd") if n == 5 else f"{n}" for n in ns]

    worker = Worker("m", predict_batch=predict_batch, metrics_port=-1)
    producer, _ = run_batch(worker, batch(7))
    assert calls == [7] + [1] * 7
    answers = {r["request_id"]: (r["output"], r["error"]) for _, _, r in producer.delivered}
    assert answers == {f"req-{i}": ((None, "RuntimeError: cannot score n=2") if i == 2 else
                                    (None, "ValueError: odd") if i == 5 else (f"{i}".encode(), None))
                       for i in range(7)}


def test_a_batch_function_must_answer_every_request():
    worker = Worker("m", predict_batch=lambda requests: ["x"] * (len(requests) + 1), metrics_port=-1)
    producer, _ = run_batch(worker, batch(3))
    assert {r["error"] for _, _, r in producer.delivered} == {"ValueError: predict_batch returned 2 answers for 1 requests"}


def test_an_answer_too_large_for_merge_becomes_an_error():
    worker = Worker("m", lambda r: "x" * 5000, metrics_port=-1, max_prediction_bytes=1000)
    producer, _ = run_batch(worker, batch(1))
    record = producer.delivered[0][2]
    assert record["output"] is None and "more than max_prediction_bytes (1000)" in record["error"]


def test_refused_predictions_are_written_again_before_the_commit(monkeypatch):
    monkeypatch.setattr("switchyard_worker.worker.time.sleep", lambda s: None)
    worker = Worker("m", lambda r: "ok", metrics_port=-1)
    producer = FakeProducer(refuse={"req-1": [KafkaError._MSG_TIMED_OUT],
                                    "req-2": [KafkaError.MSG_SIZE_TOO_LARGE]})
    producer, consumer = run_batch(worker, batch(3), producer)
    assert sorted(producer.attempts) == ["req-0", "req-1", "req-1", "req-2", "req-2"]
    by_id = {r["request_id"]: r for _, _, r in producer.delivered}
    assert by_id["req-1"]["output"] == b"ok"
    assert by_id["req-2"]["output"] is None and by_id["req-2"]["error"].startswith("KafkaError: the broker refused")
    assert consumer.commits == [([(0, 103), (1, 102)], 3)]
    assert samples(worker)["switchyard_worker_delivery_failures_total"] == 2


def test_worker_arguments():
    with pytest.raises(TypeError, match="exactly one"):
        Worker("m", metrics_port=-1)
    with pytest.raises(TypeError, match="exactly one"):
        Worker("m", lambda r: "", predict_batch=lambda rs: rs, metrics_port=-1)
