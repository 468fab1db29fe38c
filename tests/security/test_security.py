"""switchyard on a secured broker (SASL/SCRAM-SHA-512 over TLS, StandardAuthorizer, nothing allowed
without an ACL): every role works with only the ACLs of docs/security.md, is refused beyond them, and no
password shows up anywhere."""

import glob
import json
import os
import re
import subprocess
from collections import Counter

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AclBindingFilter, AclOperation, AclPermissionType, ResourcePatternType, ResourceType

import secure
from conftest import CANDIDATE, CONTROL, COUNT, DEPLOYMENT, NO_CREATE, env_of

AUTHZ = KafkaError.TOPIC_AUTHORIZATION_FAILED


# --- the end-to-end run, each role as its own principal --------------------------------------------

def test_service_routes_and_decides_every_request(pipeline):
    assert pipeline["loadgen"][0] == 0, f"loadgen as requests-producer failed: {pipeline['loadgen'][2][-2000:]}"
    assert pipeline["decisions_errors"] == [], pipeline["decisions_errors"]
    ids = Counter(d["request_id"] for d in pipeline["decisions"])
    assert set(ids) == pipeline["sent"], f"{len(pipeline['sent'] - set(ids))} requests without a decision"
    assert max(ids.values()) == 1, "a request decided twice"
    assert Counter(d["status"] for d in pipeline["decisions"]) == {"OK": COUNT}
    models = Counter(d["model"] for d in pipeline["decisions"])
    assert set(models) == {CONTROL, CANDIDATE}, models
    assert pipeline["service"].poll() is None, "switchyard run stopped"


def test_garbage_is_dead_lettered(pipeline, run):
    assert pipeline["garbage"] is None, pipeline["garbage"]
    records, errors = secure.read_topic(secure.client_conf("admin", secure.admin_password()),
                                        run.topic("DEAD_LETTER"), 1, limit_s=30, group=f"{run.prefix}check-dlq")
    assert [m.key() for m in records] == [b"user-garbage"], (records, errors)
    assert dict(records[0].headers())["dlq.kind"] == b"undecodable"


def test_each_worker_answers_its_model(pipeline):
    # fraud-v1: switchyard demo-model as User:model-fraud-v1; fraud-v2: a confluent-kafka worker as
    # User:model-fraud-v2 (its default partitioner: its answers go through the forwarded-predictions
    # topic, which the service writes and reads under its own ACLs).
    by_model = Counter(d["model"] for d in pipeline["decisions"] if d["status"] == "OK")
    assert by_model[CONTROL] > 0 and by_model[CANDIDATE] > 0, by_model
    assert pipeline["worker_v2"]["errors"] == [], pipeline["worker_v2"]["errors"]
    assert pipeline["worker_v2"]["answered"] >= by_model[CANDIDATE]
    assert all(d["output"] == b"0.25" for d in pipeline["decisions"] if d["model"] == CANDIDATE)


def test_operator_deploys_reads_status_and_promotes(pipeline):
    rc, out, err = pipeline["deploy"]
    assert rc == 0 and "version 1 written" in out, (out, err[-2000:])
    rc, out, err = pipeline["status"]
    assert rc == 0, err[-2000:]
    assert "fraud  version 1" in out and f"30.00% -> {CANDIDATE}" in out, out
    rc, out, err = pipeline["promote"]
    assert rc == 0 and "version 2" in out, (out, err[-2000:])


def test_labels_are_joined_and_scored(pipeline):
    assert pipeline["labels_delivered"] and all(e is None for e in pipeline["labels_delivered"]), \
        set(map(str, pipeline["labels_delivered"]))
    assert pipeline["labelled"] == len(pipeline["decisions"]) == COUNT, \
        f"{pipeline['labelled']} labelled answers of {COUNT}"


def test_auditor_reads_history(pipeline):
    rc, out, err = pipeline["history"]
    assert rc == 0, err[-2000:]
    assert re.search(r"\bv1\s+accepted by operator", out) and re.search(r"\bv2\s+accepted by operator", out), out
    assert "why: security test" in out, out


# --- refusals ------------------------------------------------------------------------------------

def denied(principal, operations, resource):
    """Whether the broker's authorizer log has refused one of `operations` on `resource` to `principal`."""
    with open(os.path.join(secure.STATE, "logs", "authorizer.log"), errors="replace") as f:
        return any(f"Principal = User:{principal} is Denied operation = {op} " in line
                   and f"resource = {resource} " in line for line in f for op in operations)


def conf_of(users, name, **extra):
    return secure.client_conf(name, users[name], **extra)


def test_worker_cannot_write_the_deployments_topic(pipeline, run, users):
    err = secure.produce_one(conf_of(users, "model-fraud-v1"), run.topic("DEPLOYMENTS"), b"fraud",
                             b'{"version":99,"strategy":"single","control":"fraud-v1"}')
    assert err is not None and err.code() == AUTHZ, err
    assert denied("model-fraud-v1", ("WRITE", "DESCRIBE"), f"Topic:LITERAL:{run.topic('DEPLOYMENTS')}")


def test_worker_cannot_answer_for_another_model(pipeline, run, users):
    err = secure.produce_one(conf_of(users, "model-fraud-v1"), run.topic("MODEL_PREDICTIONS", CANDIDATE), b"user-1",
                             b"forged")
    assert err is not None and err.code() == AUTHZ, err
    assert denied("model-fraud-v1", ("WRITE", "DESCRIBE"), f"Topic:LITERAL:{run.topic('MODEL_PREDICTIONS', CANDIDATE)}")


def test_worker_cannot_read_another_models_requests(pipeline, run, users):
    records, errors = secure.read_topic(conf_of(users, "model-fraud-v1"), run.topic("MODEL_REQUESTS", CANDIDATE),
                                        1, limit_s=20, group=f"{run.prefix}switchyard-model-fraud-v1")
    assert records == []
    assert any(e.code() == AUTHZ for e in errors), errors


def test_worker_cannot_deploy_with_the_cli(pipeline, run, users, admin):
    rc, out, err = run.cli("worker-deploy", ["deploy", DEPLOYMENT, "--strategy", "single", "--control", CONTROL,
                                             "--reason", "forged"],
                           env_of(run, users, "model-fraud-v1", **NO_CREATE), timeout=180)
    assert rc != 0, out
    # It may not even see the topic: refused, and said so (not "does not exist").
    assert "error:" in err and "authorization failed" in err.lower(), err[-2000:]
    records, errors = secure.read_topic(secure.client_conf("admin", secure.admin_password()),
                                        run.topic("DEPLOYMENTS"), 10, limit_s=10, group=f"{run.prefix}check")
    versions = [json.loads(m.value())["version"] for m in records if m.value()]
    assert versions and max(versions) == 2 and b"forged" not in b"".join(m.value() or b"" for m in records), versions


def test_requests_producer_cannot_read_decisions(pipeline, run, users):
    conf = conf_of(users, "requests-producer")
    topic = run.topic("DECISIONS")
    # The broker refuses even to describe the topic to it ...
    consumer = Consumer({**conf, "group.id": f"{run.prefix}not-granted", "enable.auto.commit": False})
    try:
        error = consumer.list_topics(topic, timeout=10).topics[topic].error
        assert error is not None and error.code() == AUTHZ, error
        # ... so assigned partitions never deliver a record,
        consumer.assign([TopicPartition(topic, p, 0) for p in range(4)])
        for _ in range(10):
            msg = consumer.poll(0.5)
            assert msg is None or msg.error(), "the requests producer read a decision"
    finally:
        consumer.close()
    # ... and a group member is refused as well.
    records, errors = secure.read_topic(conf, topic, 1, limit_s=15, group=f"{run.prefix}not-granted")
    assert records == []
    assert any(e.code() in (AUTHZ, KafkaError.GROUP_AUTHORIZATION_FAILED) for e in errors), errors
    assert denied("requests-producer", ("DESCRIBE", "READ"), f"Topic:LITERAL:{topic}")


def test_operator_cannot_write_the_history(pipeline, run, users):
    err = secure.produce_one(conf_of(users, "operator"), run.topic("HISTORY"), b"fraud", b"{}")
    assert err is not None and err.code() == AUTHZ, err


def test_decisions_consumer_cannot_write_decisions(pipeline, run, users):
    err = secure.produce_one(conf_of(users, "decisions-consumer"), run.topic("DECISIONS"), b"user-1", b"forged")
    assert err is not None and err.code() == AUTHZ, err


def test_labels_producer_cannot_read_requests(pipeline, run, users):
    records, errors = secure.read_topic(conf_of(users, "labels-producer"), run.topic("REQUESTS"), 1, limit_s=20,
                                        group=f"{run.prefix}fraud-decisions")
    assert records == []
    assert any(e.code() in (AUTHZ, KafkaError.GROUP_AUTHORIZATION_FAILED) for e in errors), errors


def refused(conf):
    """The errors a client with `conf` gets when it asks for metadata (which must fail)."""
    errors = []
    producer = Producer({**conf, "error_cb": errors.append})
    with pytest.raises(KafkaException):
        producer.list_topics(timeout=8)
    producer.poll(1)
    return errors


def test_wrong_password_is_refused(broker, run, users):
    errors = refused(secure.client_conf("operator", "not-" + users["operator"]))
    assert any(e.code() == KafkaError._AUTHENTICATION for e in errors), errors
    rc, out, err = run.cli("wrong-password", ["status"],
                           env_of(run, {"operator": "wrong-" + users["operator"]}, "operator"), timeout=60)
    assert rc != 0, out
    # Named as refused credentials, with the broker's reason (see docs/security.md).
    assert "refused the credentials" in err and "Authentication failed" in err, err[-2000:]


def test_client_that_does_not_trust_the_ca_is_refused(broker, users):
    conf = secure.client_conf("operator", users["operator"])
    del conf["ssl.ca.location"]
    errors = refused(conf)
    assert any(e.code() == KafkaError._SSL or "certificate verify failed" in e.str() for e in errors), errors


def test_plaintext_client_is_refused(broker):
    errors = refused({"bootstrap.servers": secure.BOOTSTRAP})
    assert errors, "a plaintext client got no error"


# --- the documented commands are what kafka-acls.sh does --------------------------------------------

def test_documented_commands_run_with_kafka_acls(admin, run, users):
    """The operator's commands through Kafka's own AclCommand (kafka-acls.sh) add exactly the bindings the
    suite granted from them (adding an existing ACL again is a no-op)."""
    tool = os.path.join(secure.REPO, "scripts", "kafka_secure.sh")
    wanted = set()
    for args in run.role_args["operator"]:
        out = subprocess.run([tool, "tool", "org.apache.kafka.tools.AclCommand"] + args, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        wanted |= {str(b) for b in secure.acl_bindings(args)}
    listed = admin.describe_acls(AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, "User:operator",
                                                  None, AclOperation.ANY, AclPermissionType.ANY)).result(30)
    mine = {str(b) for b in listed if run.prefix in b.name or b.name in secure.FIXED_NAMES}
    assert mine == wanted


# --- a missing right: retried, not lost -----------------------------------------------------------

def test_service_resumes_when_a_missing_right_is_granted(admin, run, users, tmp_path):
    """The service with its documented ACLs but Write on decisions: merge's transactions are refused
    and retried, nothing is decided; once the right is granted every request is decided, exactly once."""
    from conftest import metric_sum, metrics, wait_for
    other = secure.Run(str(tmp_path), run.prefix.rstrip(".") + "-late.")
    write = None
    for command in secure.documented_commands()["service"]:
        bindings = secure.acl_bindings(secure.localize(command, other.prefix))
        held = [b for b in bindings if b.name == other.topic("DECISIONS") and b.operation == AclOperation.WRITE]
        write = held[0] if held else write
        secure.grant(admin, [b for b in bindings if b not in held])
    assert write is not None, "the documented service ACLs have no Write on decisions"
    root = {"admin": secure.admin_password()}
    try:
        port = secure.free_port()
        service = other.spawn("service", ["run", "--metrics-address", f"127.0.0.1:{port}"],
                              other.env("switchyard", users["switchyard"], RUST_LOG="info"))
        assert wait_for(lambda: service.poll() is not None or "switchyard_" in metrics(port), 60)
        rc, out, err = other.cli("deploy", ["deploy", "late", "--strategy", "single", "--control", "m1"],
                                 env_of(other, root, "admin", RUST_LOG="warn"))
        assert rc == 0, err[-2000:]
        other.spawn("m1", ["demo-model", "--model", "m1"], env_of(other, root, "admin", RUST_LOG="warn"))
        rc, out, err = other.cli("loadgen", ["loadgen", "--deployment", "late", "--count", "50", "--rate", "50",
                                             "--run-id", other.prefix + "load"],
                                 env_of(other, root, "admin", RUST_LOG="warn"))
        assert rc == 0, err[-2000:]
        assert wait_for(lambda: metric_sum(metrics(port), "switchyard_transactions_failed_total") >= 3, 60), \
            "no refused transaction"
        assert metric_sum(metrics(port), "switchyard_decisions_total") == 0
        assert service.poll() is None, "the service stopped on a missing right"
        secure.grant(admin, [write])
        assert wait_for(lambda: metric_sum(metrics(port), "switchyard_decisions_total") >= 50, 60), \
            metric_sum(metrics(port), "switchyard_decisions_total")
        records, errors = secure.read_topic(secure.client_conf("admin", root["admin"]), other.topic("DECISIONS"), 60,
                                            limit_s=15, group=other.prefix + "check")
        ids = Counter(secure.decode("Decision", m.value())["request_id"] for m in records)
        assert len(ids) == 50 and max(ids.values()) == 1, ids
        assert {secure.decode("Decision", m.value())["status"] for m in records} == {"OK"}
    finally:
        other.stop_all()
        run.outputs += other.outputs


# --- no secret anywhere --------------------------------------------------------------------------

def test_no_password_in_any_output(pipeline, run, users):
    """Runs last: every output of the tests above is searched."""
    secrets = dict(users, admin=secure.admin_password())
    texts = {path: open(path, errors="replace").read() for path in run.outputs}
    texts["/metrics"] = pipeline["metrics"]
    for path in glob.glob(os.path.join(secure.STATE, "logs", "*.log")):
        texts[path] = open(path, errors="replace").read()
    # The check sees what it should: debug logs with librdkafka's config dump and SASL handshakes.
    service_log = texts[os.path.join(run.dir, "service.log")]
    assert "Authenticated as switchyard using SCRAM-SHA-512" in service_log
    assert "sasl.password = [redacted]" in service_log
    assert "DEBUG" in texts[os.path.join(run.dir, "deploy.err")]
    assert "switchyard_decisions_total" in pipeline["metrics"]
    leaks = [(path, name) for path, text in texts.items() for name, password in secrets.items() if password in text]
    assert leaks == [], f"passwords found in: {leaks}"
