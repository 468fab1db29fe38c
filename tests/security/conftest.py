"""Fixtures of the security suite: the secured broker (scripts/kafka_secure.sh), a SCRAM user per role
with the ACLs of docs/security.md, and one pipeline run end to end where every role is its own
principal."""

import os
import random
import re
import sys
import threading
import time
import urllib.request

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import secure  # noqa: E402
from confluent_kafka import Consumer, Producer  # noqa: E402

DEPLOYMENT = "fraud"
CONTROL, CANDIDATE = "fraud-v1", "fraud-v2"
COUNT = 200


@pytest.fixture(scope="session")
def broker():
    if not secure.broker_up():
        pytest.fail(f"no secured broker on {secure.BOOTSTRAP} (state {secure.STATE}): "
                    "run scripts/test_security.sh, or scripts/kafka_secure.sh start")
    return secure.BOOTSTRAP


@pytest.fixture(scope="session")
def admin(broker):
    return secure.admin_client()


@pytest.fixture(scope="session")
def run(broker, tmp_path_factory):
    workdir = os.environ.get("SECURITY_WORKDIR") or str(tmp_path_factory.mktemp("security"))
    os.makedirs(workdir, exist_ok=True)
    r = secure.Run(workdir, f"sec-{random.randrange(16**6):06x}.")
    yield r
    r.stop_all()


@pytest.fixture(scope="session")
def users(admin, run):
    """{principal name: password}, and the documented ACLs granted: each role's commands, the worker's
    once per model (its model's name replaced)."""
    commands = secure.documented_commands()
    expected = {"service", "worker", "operator", "requests-producer", "decisions-consumer", "labels-producer",
                "auditor"}
    assert expected <= set(commands), f"docs/security.md lacks roles {expected - set(commands)}"
    passwords = {}
    run.role_args = {}
    for role, cmds in commands.items():
        variants = [{CONTROL: model} for model in (CONTROL, CANDIDATE)] if role == "worker" else [None]
        for replace in variants:
            for command in cmds:
                args = secure.localize(command, run.prefix, replace)
                bindings = secure.acl_bindings(args)
                for b in bindings:
                    name = b.principal.split(":", 1)[1]
                    if name not in passwords:
                        passwords[name] = secure.new_password()
                        secure.create_user(admin, name, passwords[name])
                run.role_args.setdefault(role, []).append(args)
                secure.grant(admin, bindings)
    # Credentials propagate through the metadata log: wait until every user can log in.
    for name, password in passwords.items():
        deadline = time.time() + 30
        while True:
            try:
                Producer(secure.client_conf(name, password)).list_topics(timeout=10)
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
    return passwords


def env_of(run, users, name, **extra):
    return run.env(name, users[name], **extra)


NO_CREATE = {"SWITCHYARD__TOPICS__CREATE": "false"}


def worker_loop(conf, prefix, model, stop, stats):
    """A model worker from the contract (as faults.py's): confluent-kafka with its default partitioner,
    read_committed input, the request's key and request_id."""
    source = f"{prefix}model.{model}.requests"
    target = f"{prefix}model.{model}.predictions"
    consumer = Consumer({**conf, "group.id": f"{prefix}switchyard-model-{model}", "isolation.level": "read_committed",
                         "auto.offset.reset": "earliest"})
    producer = Producer({**conf, "linger.ms": 5})
    try:
        consumer.subscribe([source])
        while not stop.is_set():
            for msg in consumer.consume(500, 0.2):
                if msg.error():
                    stats["errors"].append(str(msg.error()))
                    continue
                request = secure.decode("ModelRequest", msg.value())
                prediction = {"request_id": request["request_id"], "model": model, "output": b"0.25", "error": None,
                              "produced_at": int(time.time() * 1000)}
                producer.produce(target, key=msg.key(), value=secure.encode("Prediction", prediction))
                stats["answered"] += 1
            producer.poll(0)
    except Exception as e:  # reported by the test
        stats["errors"].append(repr(e))
    finally:
        producer.flush(10)
        consumer.close()


def metrics(port):
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return ""


def metric_sum(text, name, **labels):
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(predicate, limit_s, step=0.5):
    deadline = time.time() + limit_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


@pytest.fixture(scope="session")
def pipeline(run, users, admin):
    """The service, an operator, two model workers, a request producer, a decisions consumer, a label
    producer and an auditor, each as its own principal with only its documented ACLs."""
    p = {"errors": []}
    port = secure.free_port()
    p["metrics_port"] = port
    service = run.spawn("service", ["run", "--metrics-address", f"127.0.0.1:{port}"], env_of(run, users, "switchyard"))
    p["service"] = service
    ready = wait_for(lambda: service.poll() is not None or _ready(port), 90)
    assert service.poll() is None, f"switchyard run exited with {service.returncode} (see {run.dir}/service.log)"
    assert ready, "switchyard run not ready within 90 s"

    p["deploy"] = run.cli("deploy", ["deploy", DEPLOYMENT, "--strategy", "canary", "--control", CONTROL,
                                     "--candidate", CANDIDATE, "--canary-percent", "30", "--timeout-ms", "10000",
                                     "--quality", "{}", "--reason", "security test"],
                          env_of(run, users, "operator", **NO_CREATE))
    assert p["deploy"][0] == 0, f"deploy as operator failed: {p['deploy'][2][-2000:]}"
    # The service creates the model topics when it reads the record.
    topics = [run.topic(k, m) for m in (CONTROL, CANDIDATE) for k in ("MODEL_REQUESTS", "MODEL_PREDICTIONS")]
    assert wait_for(lambda: all(t in admin.list_topics(timeout=10).topics for t in topics), 60), \
        "the service did not create the model topics"

    run.spawn("worker-v1", ["demo-model", "--model", CONTROL], env_of(run, users, "model-fraud-v1", **NO_CREATE))
    stop = threading.Event()
    p["worker_v2"] = {"answered": 0, "errors": []}
    thread = threading.Thread(target=worker_loop, daemon=True, args=(
        secure.client_conf("model-fraud-v2", users["model-fraud-v2"]), run.prefix, CANDIDATE, stop, p["worker_v2"]))
    thread.start()

    run_id = f"{run.prefix}load"
    p["loadgen"] = run.cli("loadgen", ["loadgen", "--deployment", DEPLOYMENT, "--count", str(COUNT), "--rate", "100",
                                       "--users", "60", "--run-id", run_id],
                           env_of(run, users, "requests-producer", **NO_CREATE))
    p["sent"] = {f"{run_id}-{i}" for i in range(COUNT)}
    # A record that is no request: the service dead-letters it (its Write on the dead-letter topic).
    p["garbage"] = secure.produce_one(secure.client_conf("requests-producer", users["requests-producer"]),
                                      run.topic("REQUESTS"), b"user-garbage", b"\xffnot avro")

    decisions, errors = secure.read_topic(secure.client_conf("decisions-consumer", users["decisions-consumer"]),
                                          run.topic("DECISIONS"), COUNT, limit_s=90,
                                          group=f"{run.prefix}fraud-decisions")
    p["decisions"] = [secure.decode("Decision", m.value()) for m in decisions]
    p["decision_keys"] = [m.key() for m in decisions]
    p["decisions_errors"] = errors

    # Labels for every decision, keyed by user id with Kafka's partitioner.
    labels = Producer({**secure.client_conf("labels-producer", users["labels-producer"]),
                       "partitioner": "murmur2_random"})
    delivered = []
    for d in p["decisions"]:
        outcome = {"request_id": d["request_id"], "user_id": d["user_id"], "label": 1.0 if len(d["user_id"]) % 2 else 0.0,
                   "observed_at": int(time.time() * 1000), "source": "security-test"}
        labels.produce(run.topic("OUTCOMES"), key=d["user_id"].encode(), value=secure.encode("Outcome", outcome),
                       on_delivery=lambda err, msg: delivered.append(err))
    labels.flush(30)
    p["labels_delivered"] = delivered
    p["labelled"] = wait_for(
        lambda: metric_sum(metrics(port), "switchyard_quality_labelled_total", role="serving") >= len(p["decisions"])
        and metric_sum(metrics(port), "switchyard_quality_labelled_total", role="serving"), 60)

    p["status"] = run.cli("status", ["status", DEPLOYMENT], env_of(run, users, "operator", **NO_CREATE))
    p["promote"] = run.cli("promote", ["promote", DEPLOYMENT, "--reason", "security test"],
                           env_of(run, users, "operator", **NO_CREATE))

    def history():
        out = run.cli("history", ["history", DEPLOYMENT], env_of(run, users, "auditor", **NO_CREATE))
        return out if out[0] == 0 and re.search(r"\bv2\s+accepted", out[1]) else None
    p["history"] = wait_for(history, 60, step=2) or run.cli("history", ["history", DEPLOYMENT],
                                                            env_of(run, users, "auditor", **NO_CREATE))
    p["metrics"] = metrics(port)
    stop.set()
    thread.join(30)
    yield p


def _ready(port):
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200
    except OSError:
        return False
