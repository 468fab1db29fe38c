#!/usr/bin/env python3
"""switchyard fault suite: drives a real broker and real switchyard processes through crashes, restarts,
rebalances, broker failure, stalled models and paused instances, then checks the delivery invariants on
what a read_committed consumer sees.

It is an independent client written from the contract (docs/operations.md, schemas/, docs/cohort-hash.md):
it produces Avro requests with fastavro, reads decisions with confluent-kafka, and computes cohorts with
mmh3. Run it through scripts/faults.sh, which installs its dependencies and starts the broker.

Invariants checked per scenario:
  - every request sent has exactly one decision (none lost, none duplicated, none invented);
  - the serving model of every decision is the one the cohort hash gives;
  - no shadow answer is ever served (each OK decision's output is the serving model's own answer);
  - per-user order: a user's decisions appear in the order of the user's requests (users that had a
    TIMEOUT are exempt: a timeout is decided at its deadline, after later answers);
  - bad input: every garbage record is dead-lettered with a reason, the service keeps running.
"""

import argparse
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict

import fastavro
import mmh3
from confluent_kafka import Consumer, Producer, TopicPartition

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(REPO, "target", "debug", "switchyard")
BOOTSTRAP = os.environ.get("SWITCHYARD_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
SCHEMAS = {name: fastavro.parse_schema(json.load(open(os.path.join(REPO, "schemas", f"{name}.avsc"))))
           for name in ("Request", "Decision")}

CONTROL, CANDIDATE, MIRROR = "v1", "v2", "v3"
CANARY_PERCENT = 30
DISAGREE = {CONTROL: 0.0, CANDIDATE: 100.0, MIRROR: 100.0}


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def bucket(salt, user, infix=":"):
    return mmh3.hash(f"{salt}{infix}{user}".encode(), 0, signed=False) % 10000


def demo_output(model, payload):
    """The demo model's answer (switchyard demo-model docs): a score from model and payload."""
    own = mmh3.hash(model.encode() + b":" + payload, 0, signed=False)
    if own % 10000 < DISAGREE[model] * 100:
        rotated = ((own << 16) | (own >> 16)) & 0xFFFFFFFF
        score = (rotated % 10000) / 10000
    else:
        score = (mmh3.hash(payload, 0, signed=False) % 10000) / 10000
    return f"{score:.4f}".encode()


def encode(schema, record):
    out = io.BytesIO()
    fastavro.schemaless_writer(out, SCHEMAS[schema], record)
    return out.getvalue()


def decode(schema, data):
    return fastavro.schemaless_reader(io.BytesIO(data), SCHEMAS[schema])


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Scenario:
    """One scenario's private topics, processes and records."""

    def __init__(self, name, workdir, instances_env=None):
        self.name = name
        self.prefix = f"faults-{name}-{random.randrange(16**6):06x}"
        self.dir = os.path.join(workdir, name)
        os.makedirs(self.dir, exist_ok=True)
        t = self.prefix
        self.topics = {
            "REQUESTS": f"{t}.requests", "DEPLOYMENTS": f"{t}.deployments", "ROUTED": f"{t}.routed",
            "MERGE_CHANGELOG": f"{t}.merge-state", "DECISIONS": f"{t}.decisions",
            "SHADOW_COMPARISONS": f"{t}.shadow", "DEAD_LETTER": f"{t}.dlq",
            "MODEL_REQUESTS": f"{t}.model.{{model}}.requests", "MODEL_PREDICTIONS": f"{t}.model.{{model}}.predictions",
        }
        self.env = dict(os.environ)
        self.env.update({f"SWITCHYARD__TOPICS__{k}": v for k, v in self.topics.items()})
        self.env.update({
            "SWITCHYARD_BOOTSTRAP_SERVERS": BOOTSTRAP,
            "SWITCHYARD__SERVICE__GROUP_ID": t,
            # Short sessions so that a paused or killed instance leaves the group within seconds.
            "SWITCHYARD_KAFKA_SESSION_TIMEOUT_MS": "6000",
            "SWITCHYARD_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
            "RUST_LOG": "info,rdkafka=warn",
        })
        self.instances = {}
        self.stopped = set()     # instances deliberately stopped and not restarted
        self.models = {}
        self.sent = []          # (request_id, user_id, payload) in send order
        self.garbage = 0
        self.rss_samples = []
        self.notes = {}
        self.deployment = "fraud"
        self.instance_env = {}

    # processes -------------------------------------------------------------------------------------
    def _spawn(self, name, args, extra_env=None):
        env = dict(self.env)
        env.update(extra_env or {})
        out = open(os.path.join(self.dir, f"{name}.log"), "ab")
        return subprocess.Popen([BIN] + args, env=env, stdout=out, stderr=subprocess.STDOUT)

    def start_instance(self, i):
        self.instances[i] = self._spawn(f"switchyard-{i}", ["run", "--metrics-address", "127.0.0.1:0"],
                                        {"SWITCHYARD__SERVICE__INSTANCE_ID": f"i{i}", **self.instance_env})
        self.stopped.discard(i)
        log(f"  instance {i} started (pid {self.instances[i].pid})")

    def signal_instance(self, i, sig):
        p = self.instances[i]
        p.send_signal(sig)
        log(f"  instance {i} (pid {p.pid}) <- {signal.Signals(sig).name}")
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.stopped.add(i)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log(f"  instance {i} did not stop within 60 s; killing")
                p.kill()
                p.wait()
            log(f"  instance {i} exited with {p.returncode}")

    def start_model(self, model, latency_ms=5):
        self.models[model] = self._spawn(f"model-{model}", ["demo-model", "--model", model, "--latency-ms", str(latency_ms),
                                                            "--disagree-percent", str(DISAGREE[model])])

    def signal_model(self, model, sig):
        self.models[model].send_signal(sig)
        log(f"  model {model} <- {signal.Signals(sig).name}")

    def count_in_log(self, process, text):
        with open(os.path.join(self.dir, f"{process}.log"), errors="replace") as f:
            return sum(1 for line in f if text in line)

    def cli(self, *args):
        out = subprocess.run([BIN] + list(args), env=self.env, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"switchyard {' '.join(args)} failed: {out.stderr}")
        return out.stdout

    def expected_model(self, user, decision):
        """The serving model the contract gives this user (default deployment: canary 30% + mirror)."""
        return CANDIDATE if bucket(self.deployment, user) < CANARY_PERCENT * 100 else CONTROL

    def setup(self, instances=1, timeout_ms=5000, deploy=None):
        self.cli("create-topics")
        deploy = deploy or ["--strategy", "canary", "--control", CONTROL, "--candidate", CANDIDATE,
                            "--canary-percent", str(CANARY_PERCENT), "--mirror", MIRROR]
        self.cli("deploy", self.deployment, *deploy, "--timeout-ms", str(timeout_ms))
        for model in (CONTROL, CANDIDATE, MIRROR):
            self.start_model(model)
        for i in range(instances):
            self.start_instance(i)

    def stop_all(self):
        for p in list(self.instances.values()) + list(self.models.values()):
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGCONT)
                    p.terminate()
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    # traffic ---------------------------------------------------------------------------------------
    def produce(self, count, rate, users, events=(), garbage_every=0):
        """Sends `count` requests at `rate`/s; `events` is [(at_second, callable)] run on the way."""
        producer = Producer({"bootstrap.servers": BOOTSTRAP, "enable.idempotence": True, "linger.ms": 5,
                             "message.timeout.ms": 300000, "log_level": 2})
        failures = []
        def delivered(err, msg):
            if err is not None:
                failures.append(err)
        events = sorted(events, key=lambda e: e[0])
        start = time.time()
        for n in range(count):
            due = start + n / rate
            while events and time.time() - start >= events[0][0]:
                events.pop(0)[1]()
            now = time.time()
            if due > now:
                time.sleep(due - now)
            user = f"user-{random.randrange(users)}"
            request_id = f"{self.prefix}-{n}"
            payload = f'{{"n":{n},"amount":{random.randrange(100000)}}}'.encode()
            record = {"request_id": request_id, "user_id": user, "deployment": self.deployment,
                      "sent_at": int(time.time() * 1000), "payload": payload, "attributes": {}}
            producer.produce(self.topics["REQUESTS"], key=user.encode(), value=encode("Request", record), on_delivery=delivered)
            self.sent.append((request_id, user, payload))
            if garbage_every and n % garbage_every == garbage_every // 2:
                producer.produce(self.topics["REQUESTS"], key=b"garbage", value=random.randbytes(random.randrange(0, 64)),
                                 on_delivery=delivered)
                self.garbage += 1
            producer.poll(0)
            if n % 50 == 0:
                for i, p in self.instances.items():
                    if p.poll() is None:
                        self.rss_samples.append(rss_kib(p.pid))
        for at, action in events:
            time.sleep(max(0.0, start + at - time.time()))
            action()
        remaining = producer.flush(120)
        if remaining or failures:
            raise RuntimeError(f"{remaining} requests not delivered, {len(failures)} failed: {failures[:3]}")
        log(f"  sent {count} requests ({self.garbage} garbage records) in {time.time() - start:.1f} s")

    def read_all(self, topic, expected, limit_s, settle_s=3.0, group_suffix="check"):
        consumer = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": f"{self.prefix}-{group_suffix}-{random.random()}", "log_level": 2,
                             "isolation.level": "read_committed", "enable.auto.commit": False,
                             "auto.offset.reset": "earliest"})
        metadata = consumer.list_topics(topic, timeout=30)
        partitions = [TopicPartition(topic, p, 0) for p in metadata.topics[topic].partitions]
        consumer.assign(partitions)
        records = []
        deadline = time.time() + limit_s
        reached = None
        while time.time() < deadline:
            if len(records) >= expected and reached is None:
                reached = time.time()
            if reached is not None and time.time() - reached >= settle_s:
                break
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            records.append(msg)
        consumer.close()
        return records

    # checks ----------------------------------------------------------------------------------------
    def check(self, limit_s=240):
        messages = self.read_all(self.topics["DECISIONS"], len(self.sent), limit_s)
        decisions = [(m.partition(), m.offset(), decode("Decision", m.value())) for m in messages]
        by_id = defaultdict(list)
        for p, o, d in decisions:
            by_id[d["request_id"]].append(d)
        sent_ids = {r for r, _, _ in self.sent}
        payloads = {r: (u, p) for r, u, p in self.sent}
        missing = len(sent_ids - by_id.keys())
        duplicates = sum(len(v) - 1 for v in by_id.values() if len(v) > 1)
        unknown = len(by_id.keys() - sent_ids)
        wrong_model = shadow_served = 0
        statuses = Counter()
        versions = Counter()
        for rid, ds in by_id.items():
            if rid not in payloads:
                continue
            user, payload = payloads[rid]
            for d in ds:
                statuses[d["status"]] += 1
                versions[d["config_version"]] += 1
                if d["model"] != self.expected_model(user, d):
                    wrong_model += 1
                if d["status"] == "OK" and d["output"] != demo_output(d["model"], payload):
                    shadow_served += 1
        # per-user order, on the decisions topic (one partition per user)
        sequence = {r: n for n, (r, _, _) in enumerate(self.sent)}
        per_user = defaultdict(list)
        timed_out_users = set()
        for p, o, d in sorted(decisions, key=lambda x: (x[0], x[1])):
            if d["request_id"] in sequence:
                per_user[d["user_id"]].append(sequence[d["request_id"]])
                if d["status"] == "TIMEOUT":
                    timed_out_users.add(d["user_id"])
        order_violations = sum(1 for u, seq in per_user.items() if u not in timed_out_users and seq != sorted(seq))
        result = {
            "sent": len(self.sent), "decided": len(by_id.keys() & sent_ids), "missing": missing,
            "duplicates": duplicates, "unknown": unknown, "wrong_model": wrong_model, "shadow_served": shadow_served,
            "order_violations": order_violations, "statuses": dict(statuses),
        }
        if len(versions) > 1:
            result["versions"] = {str(v): n for v, n in sorted(versions.items())}
        if self.garbage:
            letters = self.read_all(self.topics["DEAD_LETTER"], self.garbage, 60)
            reasons = [dict(m.headers() or []).get("dlq.reason") for m in letters]
            result["dead_letters"] = len(letters)
            result["dead_letters_with_reason"] = sum(1 for r in reasons if r)
        if self.rss_samples:
            samples = [s for s in self.rss_samples if s]
            result["rss_mib_max"] = round(max(samples) / 1024, 1) if samples else None
        return result


def ok(result):
    good = (result["missing"] == 0 and result["duplicates"] == 0 and result["unknown"] == 0 and result["wrong_model"] == 0
            and result["shadow_served"] == 0 and result["order_violations"] == 0)
    good = good and result.get("instances_running_at_end", True) and "failed" not in result
    if "dead_letters" in result:
        good = good and result["dead_letters"] == result["dead_letters_with_reason"] == result.get("garbage", result["dead_letters"])
    return good


# scenarios -------------------------------------------------------------------------------------------
def kill9_instance(s, a):
    s.setup(instances=1)
    def crash_and_restart():
        s.signal_instance(0, signal.SIGKILL)
        time.sleep(1)
        s.start_instance(0)
    s.produce(a.count, a.rate, a.users, events=[(a.duration * f, crash_and_restart) for f in (0.2, 0.45, 0.7)])


def sigterm_bounce(s, a):
    s.setup(instances=1)
    def bounce():
        s.signal_instance(0, signal.SIGTERM)
        s.start_instance(0)
    s.produce(a.count, a.rate, a.users, events=[(a.duration * f, bounce) for f in (0.3, 0.6)])


def scale_1_3_1(s, a):
    s.setup(instances=1)
    def up():
        s.start_instance(1)
        s.start_instance(2)
    def down():
        s.signal_instance(1, signal.SIGTERM)
        s.signal_instance(2, signal.SIGTERM)
    s.produce(a.count, a.rate, a.users, events=[(a.duration * 0.25, up), (a.duration * 0.65, down)])


def broker_kill9(s, a):
    s.setup(instances=1)
    pidfile = os.path.join(os.environ.get("KAFKA_STATE", os.path.join(REPO, ".kafka")), "kafka.pid")
    def kill_broker():
        pid = int(open(pidfile).read().strip())
        os.kill(pid, signal.SIGKILL)
        log(f"  broker (pid {pid}) <- SIGKILL")
        time.sleep(4)
        subprocess.run([os.path.join(REPO, "scripts", "kafka.sh"), "start"], check=True)
        log("  broker restarted")
    s.produce(a.count, a.rate, a.users, events=[(a.duration * 0.4, kill_broker)])


def model_stall(s, a):
    s.setup(instances=1, timeout_ms=1000)
    s.produce(a.count, a.rate, a.users, events=[(a.duration * 0.3, lambda: s.signal_model(CONTROL, signal.SIGSTOP)),
                                                (a.duration * 0.7, lambda: s.signal_model(CONTROL, signal.SIGCONT))])


def sigstop_instance(s, a):
    s.setup(instances=2)
    def pause():
        s.signal_instance(0, signal.SIGSTOP)
    def cont():
        s.signal_instance(0, signal.SIGCONT)
    # 10 s paused: past the 6 s session timeout; instance 1 takes over, instance 0 must be fenced.
    s.produce(a.count, a.rate, a.users, events=[(a.duration * 0.25, pause), (a.duration * 0.25 + 10, cont)])
    time.sleep(5)
    s.notes["zombie_transactions_refused"] = s.count_in_log("switchyard-0", "transaction failed")


def stalled_backpressure(s, a):
    # A long deadline and a small pending limit: while the serving model is stalled, merge must stop
    # taking in routed requests at the limit instead of holding them all in memory.
    s.instance_env = {"SWITCHYARD__SERVICE__MAX_PENDING": "300"}
    s.setup(instances=1, timeout_ms=8000)
    s.produce(a.count, a.rate, a.users, events=[(a.duration * 0.2, lambda: s.signal_model(CONTROL, signal.SIGSTOP)),
                                                (a.duration * 0.8, lambda: s.signal_model(CONTROL, signal.SIGCONT))])
    s.notes["intake_paused"] = s.count_in_log("switchyard-0", "pausing intake")


def canary_10(s, a):
    """Contract: a 10% canary; every user on the side the hash gives."""
    s.setup(deploy=["--strategy", "canary", "--control", CONTROL, "--candidate", CANDIDATE, "--canary-percent", "10"])
    s.expected_model = lambda user, d: CANDIDATE if bucket(s.deployment, user) < 1000 else CONTROL
    s.produce(a.count, a.rate, a.users)


def shadow(s, a):
    """Contract: shadow; control serves everyone, the candidate's answers are only compared."""
    s.setup(deploy=["--strategy", "shadow", "--control", CONTROL, "--candidate", CANDIDATE])
    s.expected_model = lambda user, d: CONTROL
    s.produce(a.count, a.rate, a.users)
    comparisons = s.read_all(s.topics["SHADOW_COMPARISONS"], len(s.sent), 120)
    s.notes["shadow_comparisons"] = len(comparisons)
    if len(comparisons) != len(s.sent):
        s.notes["failed"] = f"{len(comparisons)} comparisons for {len(s.sent)} requests"


def blue_green(s, a):
    """Contract: blue/green switched to the candidate and back, live, while traffic flows."""
    s.setup(deploy=["--strategy", "blue_green", "--control", CONTROL, "--candidate", CANDIDATE, "--active", "control"])
    serving = {1: CONTROL, 2: CANDIDATE, 3: CONTROL}
    s.expected_model = lambda user, d: serving.get(d["config_version"], "?")
    s.produce(a.count, a.rate, a.users, events=[(a.duration * 0.33, lambda: s.cli("promote", s.deployment)),
                                                (a.duration * 0.66, lambda: s.cli("rollback", s.deployment))])


def garbage_mix(s, a):
    s.setup(instances=1)
    s.produce(a.count, a.rate, a.users, garbage_every=10)


SCENARIOS = {f.__name__: f for f in (canary_10, shadow, blue_green, kill9_instance, sigterm_bounce, scale_1_3_1, broker_kill9, model_stall,
                                     sigstop_instance, stalled_backpressure, garbage_mix)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", default=list(SCENARIOS), help=f"any of {', '.join(SCENARIOS)}")
    parser.add_argument("--rate", type=int, default=200, help="requests per second")
    parser.add_argument("--duration", type=float, default=20, help="seconds of traffic per scenario")
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--workdir", default=os.path.join(REPO, ".faults"))
    a = parser.parse_args()
    a.count = int(a.rate * a.duration)
    results = {}
    for name in a.scenarios:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name}")
        log(f"scenario {name}: {a.count} requests at {a.rate}/s")
        s = Scenario(name, a.workdir)
        try:
            SCENARIOS[name](s, a)
            alive = all(p.poll() is None for i, p in s.instances.items() if i not in s.stopped)
            result = s.check()
            result["instances_running_at_end"] = alive
            result.update(s.notes)
            if s.garbage:
                result["garbage"] = s.garbage
        finally:
            s.stop_all()
        results[name] = result
        log(f"  {'PASS' if ok(result) else 'FAIL'} {json.dumps(result)}")
    print()
    print(f"{'scenario':<22} {'sent':>6} {'decided':>7} {'missing':>7} {'dupes':>5} {'wrong':>5} {'shadow':>6} {'order':>5}  statuses / extra")
    for name, r in results.items():
        extra = dict(r["statuses"])
        for k in ("dead_letters", "garbage", "rss_mib_max", "zombie_transactions_refused", "intake_paused",
                  "shadow_comparisons", "versions", "failed"):
            if k in r:
                extra[k] = r[k]
        print(f"{name:<22} {r['sent']:>6} {r['decided']:>7} {r['missing']:>7} {r['duplicates']:>5} {r['wrong_model']:>5} "
              f"{r['shadow_served']:>6} {r['order_violations']:>5}  {json.dumps(extra)}")
    passed = sum(1 for r in results.values() if ok(r))
    print(f"faults: {passed} passed, {len(results) - passed} failed")
    sys.exit(0 if passed == len(results) else 1)


if __name__ == "__main__":
    main()
