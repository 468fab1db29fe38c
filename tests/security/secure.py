"""Helpers of the security suite: the secured broker started by scripts/kafka_secure.sh, SCRAM users,
the ACLs of docs/security.md (parsed from its kafka-acls.sh commands), switchyard processes run as a
given principal, and Avro records — written from the contract (docs/operations.md, schemas/), with
confluent-kafka and fastavro only."""

import io
import json
import os
import re
import secrets
import shlex
import socket
import subprocess
import time

import fastavro
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import (AclBinding, AclOperation, AclPermissionType, AdminClient, ResourcePatternType,
                                   ResourceType, ScramCredentialInfo, ScramMechanism, UserScramCredentialUpsertion)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STATE = os.environ.get("KAFKA_SECURE_STATE", os.path.join(REPO, ".kafka-secure"))
BOOTSTRAP = f"127.0.0.1:{os.environ.get('KAFKA_SECURE_PORT', '19092')}"
CA = os.path.join(STATE, "tls", "ca.pem")
BIN = os.environ.get("SWITCHYARD_BIN", os.path.join(REPO, "target", "debug", "switchyard"))
if not os.path.isabs(BIN):
    BIN = os.path.join(REPO, BIN)
DOC = os.path.join(REPO, "docs", "security.md")
SCHEMAS = {name: fastavro.parse_schema(json.load(open(os.path.join(REPO, "schemas", f"{name}.avsc"))))
           for name in ("Request", "Decision", "ModelRequest", "Prediction", "Outcome")}

# Every topic setting (config/switchyard.toml [topics]) and its default name. A test run prefixes each
# name, and every resource name of the documented ACLs, with its own prefix.
TOPIC_DEFAULTS = {
    "REQUESTS": "requests",
    "DEPLOYMENTS": "switchyard.deployments",
    "HISTORY": "switchyard.history",
    "ROUTED": "switchyard.routed",
    "MERGE_CHANGELOG": "switchyard.merge-state",
    "FORWARDED_PREDICTIONS": "switchyard.forwarded-predictions",
    "DECISIONS": "decisions",
    "SHADOW_COMPARISONS": "shadow.comparisons",
    "OUTCOMES": "outcomes",
    "SCORED_OUTCOMES": "scored.outcomes",
    "SCORE_CHANGELOG": "switchyard.score-state",
    "DEAD_LETTER": "requests.dlq",
    "MODEL_REQUESTS": "model.{model}.requests",
    "MODEL_PREDICTIONS": "model.{model}.predictions",
}
GROUP_DEFAULT = "switchyard"
# Names switchyard does not derive from its settings, which the test leaves as they are: none (its
# whole-topic readers carry no group id).
FIXED_NAMES = set()


def admin_password():
    with open(os.path.join(STATE, "secrets", "admin.password")) as f:
        return f.read().strip()


def broker_up():
    try:
        with socket.create_connection(("127.0.0.1", int(BOOTSTRAP.rsplit(":", 1)[1])), timeout=2):
            return os.path.exists(CA) and os.path.exists(os.path.join(STATE, "secrets", "admin.password"))
    except OSError:
        return False


def new_password():
    return secrets.token_urlsafe(24)


def client_conf(user, password, **extra):
    conf = {"bootstrap.servers": BOOTSTRAP, "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": user, "sasl.password": password, "ssl.ca.location": CA}
    conf.update(extra)
    return conf


def admin_client():
    return AdminClient(client_conf("admin", admin_password()))


def create_user(admin, name, password):
    upsert = UserScramCredentialUpsertion(name, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192),
                                          password.encode())
    for future in admin.alter_user_scram_credentials([upsert]).values():
        future.result(30)


# --- the documented ACLs -------------------------------------------------------------------------

OPERATIONS = {op.name.replace("_", "").lower(): op for op in AclOperation
              if op not in (AclOperation.UNKNOWN, AclOperation.ANY)}
RESOURCE_FLAGS = {"--topic": ResourceType.TOPIC, "--group": ResourceType.GROUP,
                  "--transactional-id": ResourceType.TRANSACTIONAL_ID}


def documented_commands(path=DOC):
    """{role: [command]}: every `kafka-acls.sh` command in the fenced blocks of docs/security.md that
    follow a `# role: NAME` comment, continuation lines joined."""
    with open(path) as f:
        lines = f.read().replace("\\\n", " ").splitlines()
    roles, role, fenced = {}, None, False
    for line in lines:
        line = line.strip()
        if line.startswith("```"):
            fenced, role = not fenced, None
        elif fenced and re.match(r"#\s*role:\s*\S+$", line):
            role = line.split(":", 1)[1].strip()
            roles.setdefault(role, [])
        elif fenced and role is not None and line.startswith("kafka-acls.sh"):
            roles[role].append(line)
    return roles


def localize(command, prefix, replace=None):
    """The arguments of a documented command for this test run: `prefix` in front of every topic, group
    and transactional id (but the FIXED_NAMES), the words in `replace` replaced (another model's name),
    the secured broker's address and the admin's client settings. Fails on a flag it does not know, so
    that what the test grants is exactly what the document says."""
    args = shlex.split(command.replace('"$BOOTSTRAP"', BOOTSTRAP))[1:]
    out = []
    i = 0
    while i < len(args):
        flag = args[i]
        if flag in ("--add", "--cluster"):
            out.append(flag)
            i += 1
            continue
        if i + 1 >= len(args):
            raise ValueError(f"flag {flag!r} without a value in: {command}")
        value = args[i + 1]
        for old, new in (replace or {}).items():
            value = value.replace(old, new)
        if flag in RESOURCE_FLAGS and value not in FIXED_NAMES:
            value = prefix + value
        elif flag == "--command-config":
            value = os.path.join(STATE, "admin.properties")
        elif flag not in ("--bootstrap-server", "--allow-principal", "--allow-host", "--operation",
                          "--resource-pattern-type") + tuple(RESOURCE_FLAGS):
            raise ValueError(f"unknown flag {flag!r} in: {command}")
        out += [flag, value]
        i += 2
    return out


def acl_bindings(args):
    """The ACL bindings kafka-acls.sh `args` (as `localize` gives them) add."""
    principals, operations, resources = [], [], []
    pattern, add, host = ResourcePatternType.LITERAL, False, "*"
    i = 0
    while i < len(args):
        flag = args[i]
        if flag in ("--add", "--cluster"):
            add = add or flag == "--add"
            if flag == "--cluster":
                resources.append((ResourceType.BROKER, "kafka-cluster"))
            i += 1
            continue
        value = args[i + 1]
        if flag == "--allow-principal":
            principals.append(value)
        elif flag == "--allow-host":
            host = value
        elif flag == "--operation":
            key = value.replace("-", "").lower()
            if key not in OPERATIONS:
                raise ValueError(f"unknown operation {value!r}")
            operations.append(OPERATIONS[key])
        elif flag in RESOURCE_FLAGS:
            resources.append((RESOURCE_FLAGS[flag], value))
        elif flag == "--resource-pattern-type":
            pattern = {"literal": ResourcePatternType.LITERAL, "prefixed": ResourcePatternType.PREFIXED}[value]
        i += 2
    if not (add and principals and operations and resources):
        raise ValueError(f"not a complete --add command: {args}")
    return [AclBinding(rtype, name, ResourcePatternType.LITERAL if rtype == ResourceType.BROKER else pattern,
                       principal, host, op, AclPermissionType.ALLOW)
            for principal in principals for rtype, name in resources for op in operations]


def grant(admin, bindings):
    for future in admin.create_acls(bindings, request_timeout=30).values():
        future.result()


# --- switchyard as a principal -------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """One test run's names: every topic and group starts with `prefix`."""

    def __init__(self, workdir, prefix):
        self.dir = workdir
        self.prefix = prefix
        self.topics = {k: prefix + v for k, v in TOPIC_DEFAULTS.items()}
        self.group = prefix + GROUP_DEFAULT
        self.procs = []
        self.outputs = []     # every file a switchyard process or CLI call wrote its output to

    def topic(self, key, model=None):
        name = self.topics[key]
        return name.replace("{model}", model) if model else name

    def env(self, user, password, **extra):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHYARD")}
        env.update({f"SWITCHYARD__TOPICS__{k}": v for k, v in self.topics.items()})
        env.update({
            "SWITCHYARD_BOOTSTRAP_SERVERS": BOOTSTRAP,
            "SWITCHYARD__SERVICE__GROUP_ID": self.group,
            "SWITCHYARD__SERVICE__INSTANCE_ID": f"{self.prefix}i0",
            "SWITCHYARD__SERVICE__METRICS_ADDRESS": "127.0.0.1:0",
            # Only the documented settings: security.protocol, sasl.mechanism, sasl.username/password,
            # ssl.ca.location.
            "SWITCHYARD_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "SWITCHYARD_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "SWITCHYARD_KAFKA_SASL_USERNAME": user,
            "SWITCHYARD_KAFKA_SASL_PASSWORD": password,
            "SWITCHYARD_KAFKA_SSL_CA_LOCATION": CA,
            # Everything switchyard and librdkafka say, so that the secret check sees it all.
            "RUST_LOG": "debug",
            "SWITCHYARD_KAFKA_DEBUG": "security,conf,broker",
        })
        env.update(extra)
        return env

    def spawn(self, name, args, env):
        path = os.path.join(self.dir, f"{name}.log")
        out = open(path, "ab")
        self.outputs.append(path)
        proc = subprocess.Popen([BIN] + args, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def cli(self, name, args, env, timeout=120):
        """Runs a switchyard command; returns (exit code, stdout, stderr), all saved for the secret check."""
        out = subprocess.run([BIN] + args, env=env, capture_output=True, text=True, timeout=timeout)
        for stream, text in (("out", out.stdout), ("err", out.stderr)):
            path = os.path.join(self.dir, f"{name}.{stream}")
            with open(path, "a") as f:
                f.write(text)
            self.outputs.append(path)
        return out.returncode, out.stdout, out.stderr

    def stop_all(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- records -------------------------------------------------------------------------------------

def encode(schema, record):
    out = io.BytesIO()
    fastavro.schemaless_writer(out, SCHEMAS[schema], record)
    return out.getvalue()


def decode(schema, data):
    return fastavro.schemaless_reader(io.BytesIO(data), SCHEMAS[schema])


def read_topic(conf, topic, expected, limit_s=60, group=None, idle_s=None):
    """Reads `topic` (read_committed) from the beginning as a group member (subscribe: the group's Read
    right is used) until `expected` records arrived or `limit_s` passed. Returns (records, errors)."""
    consumer = Consumer({**conf, "group.id": group, "isolation.level": "read_committed",
                         "auto.offset.reset": "earliest", "enable.auto.commit": True})
    consumer.subscribe([topic])
    records, errors = [], []
    deadline = time.time() + limit_s
    try:
        while time.time() < deadline and len(records) < expected:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                errors.append(msg.error())
                if msg.error().code() in (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED):
                    break
                continue
            records.append(msg)
    finally:
        consumer.close()
    return records, errors


def produce_one(conf, topic, key, value, timeout=30):
    """Produces one record; returns the delivery error (None when it was written)."""
    result = {}
    producer = Producer({**conf, "message.timeout.ms": int(timeout * 1000)})

    def delivered(err, msg):
        result["err"] = err

    try:
        producer.produce(topic, key=key, value=value, on_delivery=delivered)
    except KafkaException as e:
        return e.args[0]
    producer.flush(timeout + 5)
    return result.get("err", "no delivery report")
