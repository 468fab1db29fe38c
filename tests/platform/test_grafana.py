"""deploy/grafana: the dashboard's structure and provisioning, and — against a running switchyard — that
every metric (and label) its queries use exists in a real /metrics scrape.

The running instance is driven so that every series the dashboard shows appears: a canary with a rollout
plan whose candidate fails half its requests (guards fire, the controller rolls back), a shadow
deployment with a disagreeing shadow (answering through a confluent-kafka worker on librdkafka's default
partitioner: forwarded answers) and a mirror that answers too late (missing shadows), a slow model behind
a fallback (FALLBACK) and without one (TIMEOUT, late answers discarded), outcome labels for part of the
requests with a short quality window (scored, unscored and unlabelled), garbage bytes and requests for an
unknown deployment (dead letters), a request too large for a model topic created with a small
max.message.bytes (a failed transaction, dead-lettered as unwritable), and a stale deployment record
(rejected). switchyard runs with deploy/kubernetes/switchyard.toml, as the pods do.
"""

import json
import random
import re
import threading
import time

import mmh3
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import dashboard as dash
from conftest import BOOTSTRAP, REPO, Stack, decode, encode

COMPOSE = REPO / "docker-compose.yml"
PROVISIONING = REPO / "deploy" / "grafana" / "provisioning"
DS = {"type": "prometheus", "uid": "${datasource}"}


# ------------------------------------------------------------------------------------------ structure
def test_every_panel_has_a_datasource_and_queries_that_parse():
    d = dash.load()
    assert d["uid"] == "switchyard" and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    deployment = variables["deployment"]
    assert deployment["datasource"] == DS
    assert deployment["query"]["query"] == "label_values(switchyard_config_version, deployment)"

    ids, cells = set(), {}
    rows = [p for p in d["panels"] if p["type"] == "row"]
    assert [r["repeat"] for r in rows if r.get("repeat")] == ["deployment"], "one row repeated per deployment"
    queried = 0
    for panel in dash.panels(d):
        assert panel["id"] not in ids, f"duplicate panel id {panel['id']}"
        ids.add(panel["id"])
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            assert "targets" not in panel
            continue
        assert panel.get("datasource") == DS, f"{panel['title']}: datasource {panel.get('datasource')}"
        targets = panel.get("targets") or []
        assert targets, f"{panel['title']}: no queries"
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for t in targets:
            assert t.get("datasource") == DS, f"{panel['title']} {t['refId']}"
            assert t.get("expr"), f"{panel['title']} {t['refId']}: no expr"
            refs = dash.References(t["expr"])
            assert refs.names and all(n.startswith("switchyard_") for n in refs.names), (panel["title"], refs.names)
            queried += 1
    assert queried >= 25


def test_panels_in_the_repeated_row_are_per_deployment():
    """Every query under the row repeated per deployment filters on it."""
    d = dash.load()
    in_row, checked = False, 0
    for panel in d["panels"]:
        if panel["type"] == "row":
            in_row = panel.get("repeat") == "deployment"
            continue
        if not in_row:
            continue
        for t in panel["targets"]:
            for name, matched in dash.References(t["expr"]).selectors:
                assert "deployment" in matched, f"{panel['title']}: {name} not filtered by deployment"
                checked += 1
    assert checked >= 20


def test_broken_queries_are_caught():
    """The checks above would notice a query that does not parse or names no metric."""
    with pytest.raises(ValueError):
        dash.References('sum by (model) (rate(switchyard_decisions_total[$__rate_interval])')
    with pytest.raises(AssertionError):
        dash.References('sum(rate({deployment="x"}[5m]))')
    with pytest.raises(AssertionError, match="unknown Grafana variables"):
        dash.References('rate(switchyard_decisions_total{deployment=~"$deploymnt"}[5m])')


def test_provisioning_matches_docker_compose():
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    grafana, prometheus = compose["grafana"], compose["prometheus"]
    mounts = {}
    for volume in grafana["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[(REPO / source).resolve()] = target
    assert mounts[PROVISIONING.resolve()] == "/etc/grafana/provisioning"
    dashboards_dir = mounts[dash.DASHBOARD.parent.resolve()]

    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "switchyard.yaml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == dashboards_dir
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{dashboards_dir}/{dash.DASHBOARD.name}"

    (source,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus"
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", source["url"]).groups()
    assert host == "prometheus" and f"{port}:{port}" in prometheus["ports"]
    assert "prometheus" in grafana["depends_on"]
    # ... and that Prometheus scrapes switchyard's metrics port.
    scrape = yaml.safe_load((REPO / "config" / "prometheus.yml").read_text())
    targets = [t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert "switchyard:9898" in targets and "9898:9898" in compose["switchyard"]["ports"]


# ----------------------------------------------------------------------------------- live metrics
PLAN = {"steps": [{"canary_percent": 50, "bake_ms": 2000, "min_sample": 10, "max_ms": 120000}],
        "on_alarm": "rollback", "on_end": "promote"}
# Series the scenario must produce (metric, labels): the wait below ends when all are there.
EXPECTED = [
    ("switchyard_decisions_total", {"status": "OK"}),
    ("switchyard_decisions_total", {"status": "MODEL_ERROR"}),
    ("switchyard_decisions_total", {"status": "TIMEOUT"}),
    ("switchyard_decisions_total", {"status": "FALLBACK"}),
    ("switchyard_shadow_comparisons_total", {"agreed": "true"}),
    ("switchyard_shadow_comparisons_total", {"agreed": "false"}),
    ("switchyard_shadow_missing_total", {"shadow_model": "m-slow"}),
    ("switchyard_dead_letters_total", {"reason": "undecodable"}),
    ("switchyard_dead_letters_total", {"reason": "unknown_deployment"}),
    ("switchyard_dead_letters_total", {"reason": "unwritable"}),
    ("switchyard_transactions_failed_total", {"stage": "route"}),
    ("switchyard_config_rejected_total", {"deployment": "slow"}),
    ("switchyard_predictions_forwarded_total", {"model": "m-b"}),
    ("switchyard_rollout_changes_total", {"actor": "guard:error_rate"}),
    ("switchyard_quality_unlabelled_total", {"evicted": "false"}),
    ("switchyard_quality_unscored_total", {"model": "m-bad"}),
]


def series(text, metric, labels):
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == metric and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample
    return None


def foreign_worker(stack, model, stop, answered):
    """A model worker on confluent-kafka with its default partitioner (not murmur2): most of its answers
    land on another partition than their key's, and merge forwards them."""
    from confluent_kafka import Consumer, Producer

    source = stack.topic("MODEL_REQUESTS").replace("{model}", model)
    target = stack.topic("MODEL_PREDICTIONS").replace("{model}", model)
    consumer = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": f"{stack.prefix}-worker-{model}",
                         "isolation.level": "read_committed", "auto.offset.reset": "earliest", "log_level": 2})
    producer = Producer({"bootstrap.servers": BOOTSTRAP, "linger.ms": 5, "log_level": 2})
    consumer.subscribe([source])
    try:
        while not stop.is_set():
            for msg in consumer.consume(200, 0.2):
                if msg.error():
                    continue
                request = decode("ModelRequest", msg.value())
                # m-a's answer (demo-model --disagree-percent 0: the payload's base score) for half the
                # requests, another for the rest: shadow comparisons that agree and that do not.
                base = f"{(mmh3.hash(request['payload'], 0, signed=False) % 10000) / 10000:.4f}".encode()
                output = base if mmh3.hash(request["request_id"], 1, signed=False) % 2 else b"0.4242x"
                prediction = {"request_id": request["request_id"], "model": model, "error": None,
                              "produced_at": int(time.time() * 1000), "output": output}
                answered.append(prediction)
                producer.produce(target, key=msg.key(), value=encode("Prediction", prediction))
            producer.poll(0)
    finally:
        producer.flush(10)
        consumer.close()


@pytest.fixture(scope="module")
def scrape(broker):
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    stack = Stack("grafana", extra_env={
        "SWITCHYARD_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
        "SWITCHYARD__TOPICS__REPLICATION_FACTOR": "1",
        # A short label window, so that decisions without a label are counted as such within the test.
        "SWITCHYARD__QUALITY__WINDOW_MS": "15000",
    })
    stop = threading.Event()
    try:
        stack.cli("create-topics")
        # A model topic that refuses records over 1,000 bytes: a larger request for it fails route's
        # transaction and is dead-lettered as unwritable.
        tiny = stack.topic("MODEL_REQUESTS").replace("{model}", "m-tiny")
        admin = AdminClient({"bootstrap.servers": broker})
        admin.create_topics([NewTopic(tiny, 4, 1, config={"max.message.bytes": "1000"})])[tiny].result()

        deploy = [
            ("pay", "--strategy", "canary", "--control", "m-a", "--candidate", "m-bad", "--timeout-ms", "2000",
             "--quality", "{}", "--plan", json.dumps(PLAN)),
            ("shadowed", "--strategy", "shadow", "--control", "m-a", "--candidate", "m-b", "--mirror", "m-slow",
             "--timeout-ms", "1000", "--quality", "{}"),
            ("slow", "--strategy", "single", "--control", "m-slow", "--timeout-ms", "300", "--fallback", "0.5"),
            ("stall", "--strategy", "single", "--control", "m-slow", "--timeout-ms", "300"),
            ("tiny", "--strategy", "single", "--control", "m-tiny"),
        ]
        for args in deploy:
            stack.cli("deploy", *args)
        stack.run_service("--config", str(REPO / "deploy" / "kubernetes" / "switchyard.toml"))

        stack.spawn("m-a", ["demo-model", "--model", "m-a", "--latency-ms", "5", "--disagree-percent", "0"])
        stack.spawn("m-bad", ["demo-model", "--model", "m-bad", "--latency-ms", "5", "--error-rate", "0.5",
                              "--disagree-percent", "0"])
        stack.spawn("m-slow", ["demo-model", "--model", "m-slow", "--latency-ms", "1500"])
        answered = []
        worker = threading.Thread(target=foreign_worker, args=(stack, "m-b", stop, answered), daemon=True)
        worker.start()
        stack.spawn("labeller", ["labeller", "--delay-ms", "1000", "--coverage", "0.7"])
        for name in ("pay", "shadowed", "slow", "stall"):
            stack.spawn(f"loadgen-{name}", ["loadgen", "--deployment", name, "--rate", "20", "--count", "600",
                                            "--users", "400", "--run-id", f"{name}-"])
        stack.spawn("loadgen-nope", ["loadgen", "--deployment", "nope", "--rate", "5", "--count", "5"])

        producer = Producer({"bootstrap.servers": broker, "partitioner": "murmur2_random"})
        requests = stack.topic("REQUESTS")
        for i in range(5):
            producer.produce(requests, key=f"garbage-{i}", value=b"\x00\xff not an Avro request " + bytes([i]))
        big = {"request_id": "big-1", "user_id": "user-big", "deployment": "tiny", "sent_at": int(time.time() * 1000),
               "payload": random.Random(1).randbytes(4000), "attributes": {}}  # incompressible (lz4)
        producer.produce(requests, key="user-big", value=encode("Request", big))
        # The same version as in force with other content: rejected, the version in force stays.
        producer.produce(stack.topic("DEPLOYMENTS"), key="slow",
                         value=json.dumps({"version": 1, "strategy": "single", "control": "m-a"}))
        assert producer.flush(10) == 0

        deadline, text, missing = time.time() + 150, "", EXPECTED
        while time.time() < deadline:
            text = stack.metrics()
            missing = [(m, labels) for m, labels in EXPECTED if series(text, m, labels) is None]
            references = set()
            for _, _, expr in dash.queries(dash.load()):
                references |= dash.References(expr).names
            absent = [n for n in sorted(references) if dash.Scrape(text).missing(n)]
            if not missing and not absent:
                break
            time.sleep(3)
        (stack.dir / "metrics.txt").write_text(text)
        assert not missing, f"the scenario did not produce {missing} (logs and metrics.txt in {stack.dir})"
        assert answered, "the confluent-kafka worker answered nothing"
        yield dash.Scrape(text)
    finally:
        stop.set()
        stack.stop_all()


def test_every_metric_the_dashboard_queries_is_in_the_scrape(scrape):
    problems, names = [], set()
    for title, ref, expr in dash.queries(dash.load()):
        for name in dash.References(expr).names:
            names.add(name)
            why = scrape.missing(name)
            if why:
                problems.append(f"{title} [{ref}]: {name}: {why}")
    assert problems == []
    # Histogram parts are looked up as parts of a histogram family, counters by their _total samples.
    assert "switchyard_prediction_latency_seconds_bucket" in names
    assert scrape.family_of("switchyard_prediction_latency_seconds_bucket").type == "histogram"
    assert scrape.family_of("switchyard_decisions_total").type == "counter"
    assert scrape.missing("switchyard_decisions_bucket") is not None
    assert scrape.missing("switchyard_decision_total") is not None
    assert scrape.missing("switchyard_prediction_latency_seconds") is not None


def label_problems(expr, scrape):
    refs, problems = dash.References(expr), []
    for name, matched in refs.selectors:
        for label in set(matched) - scrape.labels(name) - dash.TARGET_LABELS:
            problems.append(f"{name} has no label {label!r}")
    for labels, metrics in refs.groupings:
        available = set().union(*(scrape.labels(m) for m in metrics)) | dash.TARGET_LABELS
        for label in set(labels) - available:
            problems.append(f"grouping by {label!r}, which none of {metrics} has")
    return problems


def test_every_label_the_dashboard_uses_is_on_its_metric(scrape):
    # The deployment variable's values: label_values(switchyard_config_version, deployment).
    assert "deployment" in scrape.labels("switchyard_config_version")
    problems = [f"{title} [{ref}]: {p}" for title, ref, expr in dash.queries(dash.load()) for p in label_problems(expr, scrape)]
    assert problems == []
    # A wrong label is caught, in a matcher, a grouping or a vector matching.
    assert label_problems('sum(rate(switchyard_decisions_total{arm="x"}[5m]))', scrape)
    assert label_problems('sum by (arm) (rate(switchyard_decisions_total[5m]))', scrape)
    assert label_problems('switchyard_pending_requests / on (model) switchyard_config_version', scrape)


def test_the_dashboard_shows_every_switchyard_metric(scrape):
    """A metric switchyard exports but no panel shows fails here: add a panel (or a query) for it."""
    shown = set()
    for _, _, expr in dash.queries(dash.load()):
        shown |= {scrape.family_of(n).name for n in dash.References(expr).names if scrape.family_of(n)}
    exported = {name for name in scrape.families if name.startswith("switchyard_")}
    assert sorted(exported - shown) == []
