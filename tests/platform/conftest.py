"""Shared pieces of the platform tests: the switchyard binary, the broker, isolated topics, processes.

Every test that needs the broker isolates itself by a unique topic prefix and consumer group, the same
settings `config::isolated_env` (src/config.rs) sets for the Rust tests. Without a broker such a test is
skipped, and fails when the environment variable CI is set.
"""

import io
import json
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import fastavro
import pytest

REPO = Path(__file__).resolve().parents[2]
_bin = Path(os.environ.get("SWITCHYARD_BIN") or "target/debug/switchyard")
BIN = str(_bin if _bin.is_absolute() else REPO / _bin)
BOOTSTRAP = os.environ.get("SWITCHYARD_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
RUNS = REPO / ".platform" / "runs"

# (setting under [topics], suffix after the prefix): the list config::isolated_env uses.
ISOLATED_TOPICS = json.loads((REPO / "config" / "isolated-topics.json").read_text())["topics"]

SCHEMAS = {name: fastavro.parse_schema(json.loads((REPO / "schemas" / f"{name}.avsc").read_text()))
           for name in ("Request", "Decision", "ModelRequest", "Prediction")}


def encode(schema, record):
    out = io.BytesIO()
    fastavro.schemaless_writer(out, SCHEMAS[schema], record)
    return out.getvalue()


def decode(schema, data):
    return fastavro.schemaless_reader(io.BytesIO(data), SCHEMAS[schema])


def isolated_env(prefix, partitions=4):
    """The environment that gives a switchyard process its own topics, group and instance id."""
    env = {"SWITCHYARD_BOOTSTRAP_SERVERS": BOOTSTRAP}
    env.update({f"SWITCHYARD__TOPICS__{key}": f"{prefix}.{name}" for key, name in ISOLATED_TOPICS})
    env.update({
        "SWITCHYARD__TOPICS__PARTITIONS": str(partitions),
        "SWITCHYARD__SERVICE__GROUP_ID": prefix,
        "SWITCHYARD__SERVICE__INSTANCE_ID": f"{prefix}-0",
        "SWITCHYARD__SERVICE__METRICS_ADDRESS": "127.0.0.1:0",
    })
    return env


def unique_prefix(name):
    return f"platform-{name}-{random.randrange(16**6):06x}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=5):
    """(status, body) of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def broker_reachable():
    from confluent_kafka.admin import AdminClient
    try:
        AdminClient({"bootstrap.servers": BOOTSTRAP, "log_level": 0}).list_topics(timeout=5)
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def broker():
    """The broker's address; skips (or fails under CI) when no broker answers."""
    if not broker_reachable():
        message = f"no Kafka broker at {BOOTSTRAP} (start one with scripts/kafka.sh start)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    assert os.access(BIN, os.X_OK), f"no switchyard binary at {BIN} (set SWITCHYARD_BIN or cargo build)"
    return BOOTSTRAP


class Stack:
    """One test's isolated topics and the processes it started (only those are ever signalled)."""

    def __init__(self, name, partitions=4, extra_env=None):
        self.prefix = unique_prefix(name)
        self.dir = RUNS / self.prefix
        self.dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env.update(isolated_env(self.prefix, partitions))
        self.env.setdefault("RUST_LOG", "info,rdkafka=warn,librdkafka=error")
        self.env.update(extra_env or {})
        self.procs = {}
        self.metrics_port = None

    def topic(self, key):
        return self.env[f"SWITCHYARD__TOPICS__{key}"]

    def spawn(self, name, args, extra_env=None, binary=None):
        env = dict(self.env)
        env.update(extra_env or {})
        log = open(self.dir / f"{name}.log", "ab")
        cmd = [binary or BIN] + list(args)
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = p
        return p

    def run_service(self, *args):
        """`switchyard run` with metrics on a free port; waits until /readyz answers 200."""
        self.metrics_port = free_port()
        p = self.spawn("switchyard", ["run", *args],
                       {"SWITCHYARD__SERVICE__METRICS_ADDRESS": f"127.0.0.1:{self.metrics_port}"})
        deadline = time.time() + 60
        while time.time() < deadline:
            assert p.poll() is None, f"switchyard run exited with {p.returncode}: {self.log('switchyard')[-3000:]}"
            if http_get(f"http://127.0.0.1:{self.metrics_port}/readyz", 2)[0] == 200:
                return p
            time.sleep(0.3)
        raise AssertionError(f"switchyard did not become ready in 60 s: {self.log('switchyard')[-3000:]}")

    def metrics(self):
        status, body = http_get(f"http://127.0.0.1:{self.metrics_port}/metrics")
        assert status == 200, f"/metrics answered {status}"
        return body

    def cli(self, *args, check=True, timeout=60, extra_env=None):
        env = dict(self.env)
        env.update(extra_env or {})
        out = subprocess.run([BIN, *args], env=env, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"switchyard {' '.join(args)} exited {out.returncode}: {out.stderr[-3000:]}")
        return out

    def log(self, name):
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, name, timeout=30):
        p = self.procs.get(name)
        if p is None or p.poll() is not None:
            return p.returncode if p else None
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        return p.returncode

    def stop_all(self):
        for name in list(self.procs):
            self.stop(name)
        self.delete_topics()

    def delete_topics(self):
        """Deletes this stack's topics (all named by its unique prefix) from the shared broker."""
        from confluent_kafka.admin import AdminClient
        try:
            admin = AdminClient({"bootstrap.servers": BOOTSTRAP, "log_level": 0})
            mine = [t for t in admin.list_topics(timeout=10).topics if t.startswith(f"{self.prefix}.")]
            for future in (admin.delete_topics(mine, operation_timeout=30).values() if mine else []):
                future.result()
        except Exception as e:  # the broker is gone: nothing to tidy
            print(f"could not delete the topics of {self.prefix}: {e}")


@pytest.fixture
def make_stack(broker):
    stacks = []

    def make(name, **kwargs):
        stack = Stack(name, **kwargs)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop_all()
