"""The kit against the real switchyard binary on the local broker: a canary whose candidate is the
scikit-learn example worker, a worker function that fails for some requests, SIGTERM mid-stream, the
Confluent framing, and librdkafka's murmur2_random agreeing with Kafka's partitioner."""

import json
import os
import random
import time
from datetime import datetime
from collections import Counter, defaultdict

import mmh3
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from conftest import BOOTSTRAP, EXAMPLES, WORKERS, http_get, metric
from sklearn_worker import BreastCancerModel
from switchyard_worker import kafka_partition
from switchyard_worker.worker import Worker

SKLEARN = os.path.join(EXAMPLES, "sklearn_worker.py")
FLAKY = os.path.join(WORKERS, "flaky_worker.py")


def run_id():
    return f"r{random.randrange(16 ** 8):08x}"


def bucket(salt, user):
    return mmh3.hash(f"{salt}:{user}".encode(), 0, signed=False) % 10000


def worker_metrics(proc):
    return http_get(f"http://127.0.0.1:{proc.metrics_port}/metrics")


def assert_once(decisions, rid, count):
    ids = Counter(d["request_id"] for d in decisions)
    twice = [i for i, n in ids.items() if n > 1]
    assert not twice, f"{len(twice)} requests decided more than once, e.g. {twice[:5]}"
    missing = {f"{rid}-{i}" for i in range(count)} - set(ids)
    assert not missing, f"{len(missing)} of {count} requests got no decision, e.g. {sorted(missing)[:5]}"
    assert len(ids) == count, f"decisions for requests never sent: {sorted(set(ids) - {f'{rid}-{i}' for i in range(count)})[:5]}"


def test_canary_with_the_sklearn_worker_as_candidate(stack):
    """control: switchyard demo-model; candidate: the scikit-learn example worker. Every request is decided
    once, the candidate's users get the model's own probabilities, the split follows the cohort hash, no
    answer needed forwarding, and the worker's metrics count what it did."""
    control, candidate, deployment, percent = "bc-ctl", "bc-py", "bc", 30
    model = BreastCancerModel()
    stack.demo_model(control)
    worker = stack.python_worker("sklearn", SKLEARN, "--model", candidate)
    stack.cli("deploy", deployment, "--strategy", "canary", "--control", control, "--candidate", candidate,
              "--canary-percent", str(percent), "--timeout-ms", "20000")
    rid, count, users = run_id(), 1200, 400
    stack.loadgen(deployment, count, rate=400, users=users, run_id=rid)

    decisions = stack.decisions(rid, count)
    assert_once(decisions, rid, count)
    sent = stack.requests(rid, count)
    assert len(sent) == count

    by_cohort = defaultdict(list)
    for d in decisions:
        expected_cohort = "candidate" if bucket(deployment, d["user_id"]) < percent * 100 else "control"
        assert d["cohort"] == expected_cohort, d
        assert d["bucket"] == bucket(deployment, d["user_id"]), d
        assert d["status"] == "OK", d
        by_cohort[d["cohort"]].append(d)
    for d in by_cohort["candidate"]:
        assert d["model"] == candidate, d
        assert d["error"] is None
        # The example model's own answer to the payload loadgen sent.
        assert d["output"].decode() == model.answer(sent[d["request_id"]]["payload"]), d
        assert 0.0 <= float(d["output"]) <= 1.0
    for d in by_cohort["control"]:
        assert d["model"] == control, d
    candidate_users = {d["user_id"] for d in by_cohort["candidate"]}
    all_users = {d["user_id"] for d in decisions}
    share = len(candidate_users) / len(all_users)
    assert abs(share - percent / 100) < 0.08, f"candidate share of users {share:.3f}, canary {percent}%"
    assert len(by_cohort["candidate"]) > 0.15 * count

    # murmur2 partitioner: merge forwarded nothing.
    sy = stack.switchyard_metrics()
    assert metric(sy, "switchyard_predictions_forwarded_total") == 0, "predictions were forwarded"
    assert metric(sy, "switchyard_decisions_total", deployment=deployment, model=candidate, status="OK") == \
        len(by_cohort["candidate"])
    assert sum(stack.end_offsets("FORWARDED_PREDICTIONS").values()) == 0, "the forwarded topic has records"

    # The worker's metrics: one answer per candidate decision (no restart: exactly once here).
    m = worker_metrics(worker)
    answered = len(by_cohort["candidate"])
    assert metric(m, "switchyard_worker_requests_total", model=candidate) == answered
    assert metric(m, "switchyard_worker_errors_total", model=candidate) == 0
    assert metric(m, "switchyard_worker_undecodable_total", model=candidate) == 0
    assert metric(m, "switchyard_worker_latency_seconds_count", model=candidate) == answered
    assert metric(m, "switchyard_worker_batch_size_sum", model=candidate) == answered
    batches = metric(m, "switchyard_worker_batch_size_count", model=candidate)
    assert 1 <= batches <= answered
    assert metric(m, "switchyard_worker_predict_seconds_count", model=candidate) == batches
    # Every answer within the deadline, and the latency histogram says so.
    assert metric(m, "switchyard_worker_latency_seconds_bucket", model=candidate, le="+Inf") == answered


def test_function_errors_and_garbage_input(stack):
    """A function that raises for every 7th request: those get MODEL_ERROR decisions carrying the message,
    all others OK with the function's answer; records that are not ModelRequests are counted and skipped.
    Once with predict (one request at a time) and once with a predict_batch that fails whole batches."""
    runs = {}
    for mode in ("one", "batch"):
        model, deployment = f"flaky-{mode}", f"flaky-{mode}"
        worker = stack.python_worker(f"flaky-{mode}", FLAKY, "--model", model, "--mode", mode,
                                     "--fail-mod", "7", "--fail-rem", "3")
        # Garbage on the worker's input topic, before any real request.
        producer = Producer({"bootstrap.servers": BOOTSTRAP, "partitioner": "murmur2_random"})
        for value in (b"\x00\x01garbage", b"", b"{\"not\": \"avro\"}"):
            producer.produce(stack.topic("MODEL_REQUESTS", model), key=b"user-x", value=value)
        producer.flush(10)
        stack.cli("deploy", deployment, "--strategy", "single", "--control", model, "--timeout-ms", "20000")
        rid = run_id()
        runs[mode] = (model, worker, rid, stack.loadgen_async(deployment, 700, 350, 200, rid))
    for mode, (model, worker, rid, load) in runs.items():
        assert load.popen.wait(60) == 0, load.log()
        decisions = stack.decisions(rid, 700)
        assert_once(decisions, rid, 700)
        failing = 0
        for d in decisions:
            n = int(d["request_id"].rsplit("-", 1)[1])
            assert d["model"] == model
            if n % 7 == 3:
                failing += 1
                assert d["status"] == "MODEL_ERROR", d
                assert d["error"] == f"ValueError: no answer for n={n}", d
                assert d["output"] is None
            else:
                assert d["status"] == "OK", d
                assert d["output"] == f"n={n}".encode(), d
        assert failing == 100
        m = worker_metrics(worker)
        assert metric(m, "switchyard_worker_requests_total", model=model) == 700
        assert metric(m, "switchyard_worker_errors_total", model=model) == failing
        assert metric(m, "switchyard_worker_undecodable_total", model=model) == 3
        assert worker.log().count("skipping a record that is not a ModelRequest") == 3
        assert worker.popen.poll() is None, "the worker stopped"


def test_sigterm_mid_stream_loses_nothing(stack):
    """SIGTERM while requests flow: the worker answers the batch in hand, commits and exits 0; a new worker
    takes over from the committed offsets — every request decided once, all OK, and no request answered
    twice (the in-flight batch was committed)."""
    model = deployment = "bounce"
    # Each batch takes 300 ms: with requests flowing, the worker is nearly always inside one.
    args = ("--model", model, "--mode", "batch", "--sleep-ms", "300")
    first = stack.python_worker("bounce-1", FLAKY, *args)
    stack.cli("deploy", deployment, "--strategy", "single", "--control", model, "--timeout-ms", "60000")
    rid, count = run_id(), 1500
    load = stack.loadgen_async(deployment, count, 250, 300, rid)
    time.sleep(2.5)
    # Signal just after a batch started (its log line at most 100 ms old), so it arrives inside the batch.
    deadline = time.time() + 20
    while time.time() < deadline:
        lines = [line for line in first.log().splitlines() if "batch of" in line]
        if lines and lines[-1].endswith("started"):
            started = datetime.strptime(lines[-1][:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if time.time() - started < 0.1:
                break
        time.sleep(0.005)
    stopped_at = time.time()
    assert first.terminate(timeout=20) == 0, first.log()[-2000:]
    took = time.time() - stopped_at
    assert took < 10, f"the worker took {took:.1f} s to stop"
    log = first.log()
    assert "SIGTERM: finishing the batch in hand" in log
    # The signal arrived inside a batch (started, not done), which was then finished and no other begun.
    before, after = log.split("SIGTERM: finishing the batch in hand", 1)
    assert before.rsplit("batch of ", 1)[1].split()[1] == "started", before[-500:]
    assert "started" not in after and "done" in after, after
    answered_first = int(log.rsplit("answered ", 1)[1].split()[0])
    assert 0 < answered_first < count, answered_first
    second = stack.python_worker("bounce-2", FLAKY, *args)
    assert load.popen.wait(60) == 0
    decisions = stack.decisions(rid, count, limit_s=150)
    assert_once(decisions, rid, count)
    statuses = Counter(d["status"] for d in decisions)
    assert statuses == {"OK": count}, statuses
    assert all(d["output"] == f"n={d['request_id'].rsplit('-', 1)[1]}".encode() for d in decisions)
    answered_second = metric(worker_metrics(second), "switchyard_worker_requests_total", model=model)
    assert answered_first + answered_second == count, \
        f"answered {answered_first} + {answered_second}: the stopped worker's last batch was not committed"


def test_kill9_mid_stream_loses_nothing(stack):
    """kill -9 while requests flow: the batch in hand was never committed, so the next worker answers it
    (again, for whatever had been written): every request still decided exactly once, all OK."""
    model = deployment = "crash"
    args = ("--model", model, "--mode", "batch", "--sleep-ms", "100")
    first = stack.python_worker("crash-1", FLAKY, *args)
    stack.cli("deploy", deployment, "--strategy", "single", "--control", model, "--timeout-ms", "60000")
    rid, count = run_id(), 1000
    load = stack.loadgen_async(deployment, count, 250, 300, rid)
    time.sleep(2)
    first.popen.kill()
    first.popen.wait(10)
    second = stack.python_worker("crash-2", FLAKY, *args)
    assert load.popen.wait(60) == 0
    decisions = stack.decisions(rid, count, limit_s=150)
    assert_once(decisions, rid, count)
    assert Counter(d["status"] for d in decisions) == {"OK": count}
    answered_second = metric(worker_metrics(second), "switchyard_worker_requests_total", model=model)
    assert 0 < answered_second < count + 500


def test_confluent_framing(make_stack):
    """With codec.framing = "confluent" the kit reads framed requests and writes framed predictions."""
    s = make_stack("confluent", framing="confluent")
    model = deployment = "framed"
    worker = s.python_worker("framed", FLAKY, "--model", model, "--fail-mod", "5", "--fail-rem", "0")
    s.cli("deploy", deployment, "--strategy", "single", "--control", model, "--timeout-ms", "20000")
    rid = run_id()
    s.loadgen(deployment, 200, rate=400, users=50, run_id=rid)
    decisions = s.decisions(rid, 200)     # decoded with the Confluent header checked (schema id 4)
    assert_once(decisions, rid, 200)
    for d in decisions:
        n = int(d["request_id"].rsplit("-", 1)[1])
        assert (d["status"], d["output"]) == (("MODEL_ERROR", None) if n % 5 == 0 else ("OK", f"n={n}".encode())), d
    # The predictions on the wire carry the Confluent header with the prediction schema id (3).
    consumer = s.consumer()
    consumer.subscribe([s.topic("MODEL_PREDICTIONS", model)])
    values, deadline = [], time.time() + 30
    while len(values) < 200 and time.time() < deadline:
        values += [m.value() for m in consumer.consume(500, 0.5) if not m.error()]
    consumer.close()
    assert len(values) == 200
    assert all(v[:5] == b"\x00\x00\x00\x00\x03" for v in values)
    assert metric(worker_metrics(worker), "switchyard_worker_undecodable_total", model=model) == 0


def test_librdkafka_murmur2_random_matches_kafka_partitioner(broker):
    """The kit's producer settings put each key where Kafka's Java partitioner would (7 partitions, so
    the check does not pass by luck with a power of two)."""
    topic = f"pykit-partitioner-{random.randrange(16 ** 6):06x}"
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    admin.create_topics([NewTopic(topic, num_partitions=7, replication_factor=1)])[topic].result()
    try:
        settings = Worker("m", lambda r: "", bootstrap_servers=BOOTSTRAP, metrics_port=-1)._producer_settings()
        producer = Producer(settings)
        placed = {}
        keys = [f"user-{i}".encode() for i in range(300)] + [bytes(range(200, 200 + n)) for n in range(13)] + \
            ["ünïcode-用户-{i}".format(i=i).encode() for i in range(20)]
        for key in keys:
            producer.produce(topic, key=key, value=b"x",
                             on_delivery=lambda err, msg, key=key: placed.__setitem__(key, (err, msg.partition())))
        producer.flush(30)
        assert len(placed) == len(keys)
        wrong = [(k, p, kafka_partition(k, 7)) for k, (err, p) in placed.items() if err or p != kafka_partition(k, 7)]
        assert not wrong, wrong[:5]
        assert len({p for _, p in placed.values()}) == 7
    finally:
        admin.delete_topics([topic], operation_timeout=30)[topic].result()
