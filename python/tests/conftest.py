"""Shared fixtures: the real switchyard binary on the local broker, isolated by a topic prefix and group id
(the same variables as `config::isolated_env` in src/config.rs), model workers as subprocesses, loadgen,
a read_committed reader of the decisions, and the schema registry of SWITCHYARD_TEST_REGISTRY (its
Confluent API base URL; scripts/test_python.sh starts one with scripts/registry.sh)."""

import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import fastavro
import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

TESTS = os.path.dirname(os.path.abspath(__file__))
PYTHON_DIR = os.path.dirname(TESTS)
REPO = os.path.dirname(PYTHON_DIR)
EXAMPLES = os.path.join(PYTHON_DIR, "examples")
WORKERS = os.path.join(TESTS, "workers")
BIN = os.environ.get("SWITCHYARD_BIN", "target/debug/switchyard")
BIN = BIN if os.path.isabs(BIN) else os.path.join(REPO, BIN)
BOOTSTRAP = os.environ.get("SWITCHYARD_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
LOGS = os.path.join(REPO, ".python-kit", "logs")
# (setting under [topics], suffix after the prefix): the list config::isolated_env uses.
with open(os.path.join(REPO, "config", "isolated-topics.json")) as f:
    ISOLATED_TOPICS = json.load(f)["topics"]
REGISTRY = os.environ.get("SWITCHYARD_TEST_REGISTRY", "").strip().rstrip("/")
PARTITIONS = 4
SCHEMA_IDS = {"Request": 1, "ModelRequest": 2, "Prediction": 3, "Decision": 4}

for path in (EXAMPLES, WORKERS):
    if path not in sys.path:
        sys.path.insert(0, path)


def repo_schema(name):
    with open(os.path.join(REPO, "schemas", f"{name}.avsc")) as f:
        return fastavro.parse_schema(json.load(f))


SCHEMAS = {name: repo_schema(name) for name in SCHEMA_IDS}


def decode(name, data, framing="plain", schema_id=None):
    if framing == "confluent":
        expected = SCHEMA_IDS[name] if schema_id is None else schema_id
        assert data[0] == 0 and int.from_bytes(data[1:5], "big") == expected, (data[:5], name, expected)
        data = data[5:]
    return fastavro.schemaless_reader(io.BytesIO(data), SCHEMAS[name])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def metric(text, name, **labels):
    """The sum of the samples of `name` whose labels include `labels` (0 when there is none)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(4))
    return total


def broker_available():
    try:
        AdminClient({"bootstrap.servers": BOOTSTRAP, "log_level": 0}).list_topics(timeout=5)
        return True
    except KafkaException:
        return False


# The schema registry (Confluent API) ------------------------------------------------------------------

def registry_request(method, path, body=None, base=None):
    """(status, parsed JSON answer) of a registry call; `path` starts with "/"."""
    request = urllib.request.Request(f"{base or REGISTRY}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/vnd.schemaregistry.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, text.decode(errors="replace")


def subject_path(subject):
    return f"/subjects/{urllib.parse.quote(subject, safe='')}"


def register(subject, schema_text):
    """Registers a schema (its text) under `subject` and returns its id; fails on anything but 200."""
    status, answer = registry_request("POST", f"{subject_path(subject)}/versions", {"schema": schema_text})
    assert status == 200, f"registering under {subject}: {status} {answer}"
    return answer["id"]


def latest_id(subject):
    status, answer = registry_request("GET", f"{subject_path(subject)}/versions/latest")
    assert status == 200, f"latest version of {subject}: {status} {answer}"
    return answer["id"]


def registry_answers(url):
    try:
        with urllib.request.urlopen(f"{url}/subjects", timeout=5) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="session")
def registry():
    """The schema registry's Confluent API base URL; a test that needs it fails under CI when there is none
    (skips elsewhere)."""
    if not REGISTRY:
        message = "no schema registry: SWITCHYARD_TEST_REGISTRY is not set (scripts/registry.sh start)"
    elif not registry_answers(REGISTRY):
        message = f"the schema registry at {REGISTRY} does not answer"
    else:
        return REGISTRY
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def broker():
    """The local broker; a test that needs it fails under CI when it is missing (skips elsewhere)."""
    if not broker_available():
        message = f"no Kafka broker at {BOOTSTRAP} (start one: scripts/kafka.sh start)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    if not os.access(BIN, os.X_OK):
        pytest.fail(f"no switchyard binary at {BIN} (cargo build, or set SWITCHYARD_BIN)")
    return BOOTSTRAP


class Proc:
    def __init__(self, name, popen, log_path):
        self.name, self.popen, self.log_path = name, popen, log_path

    @property
    def pid(self):
        return self.popen.pid

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_log(self, pattern, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if re.search(pattern, self.log()):
                return
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.popen.returncode}) before logging {pattern!r}:\n"
                                     f"{self.log()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"{self.name} did not log {pattern!r} within {timeout} s:\n{self.log()[-3000:]}")

    def terminate(self, timeout=30):
        """SIGTERM, then wait; SIGKILL if it does not stop in time. Returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


class Stack:
    """One switchyard instance (route + merge) on topics of its own, and the processes around it."""

    def __init__(self, name, framing="plain", registry=None):
        self.prefix = f"pykit-{name}-{random.randrange(16 ** 6):06x}"
        self.framing = framing
        self.registry = registry
        self.schema_ids = {}
        self.logs = os.path.join(LOGS, self.prefix)
        os.makedirs(self.logs, exist_ok=True)
        self.metrics_address = f"127.0.0.1:{free_port()}"
        t = self.prefix
        self.topics = {key: f"{t}.{suffix}" for key, suffix in ISOLATED_TOPICS}
        self.env = dict(os.environ)
        self.env.update({f"SWITCHYARD__TOPICS__{k}": v for k, v in self.topics.items()})
        self.env.update({
            "SWITCHYARD_BOOTSTRAP_SERVERS": BOOTSTRAP,
            "SWITCHYARD__TOPICS__PARTITIONS": str(PARTITIONS),
            "SWITCHYARD__SERVICE__GROUP_ID": t,
            "SWITCHYARD__SERVICE__INSTANCE_ID": f"{t}-0",
            "SWITCHYARD__SERVICE__METRICS_ADDRESS": self.metrics_address,
            "SWITCHYARD__CODEC__FRAMING": framing,
            "RUST_LOG": "info,rdkafka=warn,librdkafka=error",
            "PYTHONUNBUFFERED": "1",
            # Two cores shared: scikit-learn and numpy on one thread each.
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        })
        if registry:
            self.env.update({"SWITCHYARD__CODEC__REGISTRY_URL": registry, "SWITCHYARD__CODEC__REGISTRY_WAIT_MS": "20000"})
        self.procs = []
        self.switchyard = None

    def topic(self, key, model=None):
        return self.topics[key].replace("{model}", model or "")

    #: The topic (pattern) whose subject holds switchyard's schema of each record.
    SUBJECT_TOPICS = {"Request": "REQUESTS", "ModelRequest": "MODEL_REQUESTS", "Prediction": "MODEL_PREDICTIONS",
                      "Decision": "DECISIONS"}

    def schema_id(self, name):
        """The id records of `name` are framed with: the fixed one, or with a registry the id registered
        under the subject of its topic (for per-model records, the topic pattern's subject)."""
        if not self.registry:
            return SCHEMA_IDS[name]
        if name not in self.schema_ids:
            self.schema_ids[name] = latest_id(f"{self.topics[self.SUBJECT_TOPICS[name]]}-value")
        return self.schema_ids[name]

    def decode(self, name, data):
        return decode(name, data, self.framing, self.schema_id(name) if self.framing == "confluent" else None)

    def spawn(self, name, args, env=None):
        log_path = os.path.join(self.logs, f"{name}.log")
        out = open(log_path, "ab")
        popen = subprocess.Popen(args, env={**self.env, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                                 cwd=REPO)
        out.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def start(self):
        self.switchyard = self.spawn("switchyard", [BIN, "run"])
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if http_get(f"http://{self.metrics_address}/readyz", timeout=2).strip() == "ready":
                    return self
            except OSError:
                pass
            if self.switchyard.popen.poll() is not None:
                raise AssertionError(f"switchyard exited: {self.switchyard.log()[-3000:]}")
            time.sleep(0.25)
        raise AssertionError(f"switchyard not ready within 90 s: {self.switchyard.log()[-3000:]}")

    def cli(self, *args, timeout=120):
        out = subprocess.run([BIN, *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        assert out.returncode == 0, f"switchyard {' '.join(args)} failed: {out.stderr}"
        return out.stdout

    def demo_model(self, model, *extra):
        proc = self.spawn(f"demo-{model}", [BIN, "demo-model", "--model", model, *extra])
        proc.wait_log("demo model answering")
        return proc

    def python_worker(self, name, script, *args, metrics_port=None, env=None):
        """A kit worker as its own process; waits until it is answering. Its metrics port is `.metrics_port`."""
        port = metrics_port or free_port()
        proc = self.spawn(name, [sys.executable, script, *args],
                          env={"SWITCHYARD_WORKER_METRICS_PORT": str(port), **(env or {})})
        proc.metrics_port = port
        proc.wait_log(r"answering: ")
        return proc

    def loadgen(self, deployment, count, rate, users, run_id):
        out = subprocess.run([BIN, "loadgen", "--deployment", deployment, "--count", str(count), "--rate", str(rate),
                              "--users", str(users), "--run-id", run_id],
                             env=self.env, capture_output=True, text=True, timeout=count / rate + 60, cwd=REPO)
        assert out.returncode == 0, f"loadgen failed: {out.stderr}"

    def loadgen_async(self, deployment, count, rate, users, run_id):
        return self.spawn(f"loadgen-{run_id}", [BIN, "loadgen", "--deployment", deployment, "--count", str(count),
                                                "--rate", str(rate), "--users", str(users), "--run-id", run_id])

    def consumer(self):
        return Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": f"{self.prefix}-check-{random.randrange(1 << 30)}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "isolation.level": "read_committed", "log_level": 2})

    def read(self, key, schema, want, limit_s=120, settle_s=3.0):
        """Records of topic `key` decoded as `schema`, read_committed from the start, until `want(records)`
        is true and then `settle_s` more seconds (so duplicates would show), or `limit_s` passes."""
        consumer = self.consumer()
        consumer.subscribe([self.topic(key)])
        records, deadline, done_at = [], time.time() + limit_s, None
        try:
            while time.time() < deadline:
                for msg in consumer.consume(1000, 0.5):
                    if msg.error():
                        continue
                    records.append((msg, self.decode(schema, msg.value())))
                if done_at is None and want(records):
                    done_at = time.time()
                if done_at is not None and time.time() - done_at >= settle_s:
                    break
        finally:
            consumer.close()
        return records

    def decisions(self, run_id, count, limit_s=120):
        """The decisions of the requests `<run_id>-0` .. `<run_id>-<count-1>` (a list; duplicates kept)."""
        prefix = f"{run_id}-"
        def mine(records):
            return [d for _, d in records if d["request_id"].startswith(prefix)]
        records = self.read("DECISIONS", "Decision", lambda rs: len({d["request_id"] for d in mine(rs)}) >= count,
                            limit_s=limit_s)
        return mine(records)

    def requests(self, run_id, count):
        """request_id -> Request as loadgen sent it."""
        prefix = f"{run_id}-"
        def mine(records):
            return {r["request_id"]: r for _, r in records if r["request_id"].startswith(prefix)}
        return mine(self.read("REQUESTS", "Request", lambda rs: len(mine(rs)) >= count, settle_s=0.5))

    def end_offsets(self, key):
        """Partition -> high watermark of topic `key`."""
        consumer = self.consumer()
        try:
            meta = consumer.list_topics(self.topic(key), timeout=10).topics[self.topic(key)]
            return {p: consumer.get_watermark_offsets(TopicPartition(self.topic(key), p), timeout=10)[1]
                    for p in meta.partitions}
        finally:
            consumer.close()

    def switchyard_metrics(self):
        return http_get(f"http://{self.metrics_address}/metrics")

    def stop(self):
        for proc in reversed(self.procs):
            proc.terminate()
        admin = AdminClient({"bootstrap.servers": BOOTSTRAP, "log_level": 0})
        try:
            mine = [t for t in admin.list_topics(timeout=10).topics if t.startswith(self.prefix + ".")]
            if mine:
                for future in admin.delete_topics(mine, operation_timeout=30).values():
                    try:
                        future.result()
                    except KafkaException:
                        pass
        except KafkaException:
            pass


@pytest.fixture(scope="module")
def stack(broker, request):
    s = Stack(request.module.__name__.split(".")[-1].replace("test_", "").replace("_", "-"))
    s.start()
    yield s
    s.stop()


@pytest.fixture
def make_stack(broker):
    """A stack of its own (for another codec framing); stopped after the test."""
    made = []
    def make(name, **kwargs):
        made.append(Stack(name, **kwargs).start())
        return made[-1]
    yield make
    for s in made:
        s.stop()
