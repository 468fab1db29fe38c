"""deploy/kubernetes: rendered with kustomize (kubectl from PyPI), every built-in kind validated strictly
against the Kubernetes JSON schemas bundled by kubernetes-validate, the ServiceMonitor against the
prometheus-operator CRD schema (compiled validators from npm), the pieces checked against each other and
against switchyard's configuration, and the shipped switchyard.toml run against the broker."""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from conftest import REPO, Stack, http_get

K8S = REPO / "deploy" / "kubernetes"
# The oldest Kubernetes version the manifests are meant for, and the newest kubernetes-validate ships.
K8S_VERSIONS = ["1.30.0", "1.37.0"]
# Kinds without a schema in kubernetes-validate (custom resources); validated separately or not at all.
CUSTOM_KINDS = {"ServiceMonitor"}
KUBECTL = str(Path(sys.executable).parent / "kubectl")
CRD_DIR = Path(os.environ.get("PLATFORM_CRD_DIR", REPO / ".platform" / "crd"))


def render(directory):
    out = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed: {out.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def validation_errors(resources):
    """(errors, kinds left unvalidated) for the built-in kinds, strict (unknown fields are errors)."""
    errors, unvalidated = [], set()
    for resource in resources:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(resource, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                unvalidated.add(resource["kind"])
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                errors.append(f"{resource['kind']}/{resource['metadata']['name']} (Kubernetes {version}): {path}: {e.message}")
    return errors, unvalidated


def crd_validate(resources):
    """Runs the ServiceMonitor validator (tests/platform/crd, installed by scripts/test_platform.sh)."""
    script = CRD_DIR / "validate.mjs"
    assert (CRD_DIR / "node_modules").is_dir(), f"{CRD_DIR} has no node_modules: run scripts/test_platform.sh (npm ci)"
    monitors = [r for r in resources if r["kind"] == "ServiceMonitor"]
    return subprocess.run(["node", str(script)], input=json.dumps(monitors), capture_output=True, text=True,
                          timeout=60), len(monitors)


def by_kind(resources):
    out = {}
    for r in resources:
        out.setdefault(r["kind"], []).append(r)
    return out


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture(scope="module")
def rendered():
    return render(K8S)


def test_every_built_in_kind_validates_against_the_kubernetes_schemas(rendered):
    kinds = {r["kind"] for r in rendered}
    assert {"StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget", "ServiceMonitor"} <= kinds, kinds
    example = [d for d in yaml.safe_load_all((K8S / "secret.example.yaml").read_text()) if d]
    errors, unvalidated = validation_errors(rendered + example)
    assert errors == []
    # Only the custom resources are left to the CRD check below; a new kind without a schema fails here.
    assert unvalidated == CUSTOM_KINDS


def test_service_monitor_validates_against_its_crd_schema(rendered):
    out, count = crd_validate(rendered)
    assert count == 1
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "valid switchyard"


# (The schemas do not carry every enum: a podManagementPolicy of "AllAtOnce" validates; the API server
# would refuse it.)
BREAKAGES = {
    # an unknown field (a typo): only strict validation catches it
    "unknown field": ("statefulset.yaml", lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0]
                      .update({"containerPortt": 9898})),
    "wrong type": ("statefulset.yaml", lambda d: d["spec"].update({"replicas": "three"})),
    "missing required field": ("services.yaml", lambda d: d["spec"]["ports"][0].pop("port")),
    "list for a map": ("statefulset.yaml", lambda d: d["spec"]["template"]["spec"]["containers"][0]
                       .update({"resources": {"limits": ["2Gi"]}})),
    "misplaced field": ("poddisruptionbudget.yaml", lambda d: d.update({"maxUnavailable": d["spec"].pop("maxUnavailable")})),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_broken_manifest_fails_validation(tmp_path, breakage):
    filename, mutate = BREAKAGES[breakage]
    copy_dir = tmp_path / "kubernetes"
    shutil.copytree(K8S, copy_dir)
    docs = [d for d in yaml.safe_load_all((copy_dir / filename).read_text()) if d]
    mutate(docs[0])
    (copy_dir / filename).write_text(yaml.safe_dump_all(docs))
    errors, _ = validation_errors(render(copy_dir))
    assert errors, f"{breakage}: the broken copy validated"
    # The untouched original still validates (the failure is the breakage's).
    assert validation_errors(render(K8S))[0] == []


def test_a_broken_service_monitor_fails_its_crd_check(rendered):
    broken = copy.deepcopy(rendered)
    monitor = next(r for r in broken if r["kind"] == "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["port"] = 9898          # must be the port's name (a string)
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    out, _ = crd_validate(broken)
    assert out.returncode == 1
    assert "port must be string" in out.stdout and "interval must match pattern" in out.stdout, out.stdout


def test_a_kustomization_naming_a_missing_file_fails(tmp_path):
    copy_dir = tmp_path / "kubernetes"
    shutil.copytree(K8S, copy_dir)
    (copy_dir / "poddisruptionbudget.yaml").unlink()
    with pytest.raises(RuntimeError, match="poddisruptionbudget.yaml"):
        render(copy_dir)


def test_the_pieces_fit_together(rendered):
    k = by_kind(rendered)
    (sts,), (pdb,), (monitor,), (config_map,) = k["StatefulSet"], k["PodDisruptionBudget"], k["ServiceMonitor"], k["ConfigMap"]
    services = {s["metadata"]["name"]: s for s in k["Service"]}
    pod = sts["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]

    # Selectors: the StatefulSet's, both Services', the PDB's all select the pods.
    assert matches(sts["spec"]["selector"]["matchLabels"], pod_labels)
    for service in services.values():
        assert matches(service["spec"]["selector"], pod_labels), service["metadata"]["name"]
    assert matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert pdb["spec"]["maxUnavailable"] == 1

    # The headless Service governs the StatefulSet (stable pod DNS names).
    headless = services[sts["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"

    # The ServiceMonitor selects exactly one Service (no pod scraped twice), on a port it has.
    selected = [s for s in services.values() if matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in selected] == ["switchyard-metrics"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in selected[0]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"

    # The instance id is the pod name (downward API): stable across restarts, unique among pods.
    env = {e["name"]: e for e in container["env"]}
    assert env["SWITCHYARD__SERVICE__INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"

    # Config: the generated ConfigMap (its hashed name) is mounted and passed with --config.
    (volume,) = [v for v in pod["spec"]["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert config_map["metadata"]["name"].startswith("switchyard-config-")
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert container["args"][:1] == ["run"]
    config_path = container["args"][container["args"].index("--config") + 1]
    assert config_path == f"{mount['mountPath']}/switchyard.toml"
    assert config_map["data"]["switchyard.toml"] == (K8S / "switchyard.toml").read_text()

    # Probes on the metrics port, which is the port switchyard listens on, on all interfaces.
    toml = tomllib.loads(config_map["data"]["switchyard.toml"])
    host, port = toml["service"]["metrics_address"].rsplit(":", 1)
    assert host == "0.0.0.0", "the kubelet and Prometheus reach the pod on its own address, not loopback"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == int(port)
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}

    # Graceful shutdown fits: a transaction (transaction.timeout.ms 10 s) plus each stage leaving its
    # group (up to 5 s each for route, merge and score), with room to spare.
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 10 + 3 * 5 + 15

    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind

    # Secrets: passed through as SWITCHYARD_KAFKA_<OPTION> variables from the Secret.
    (secret_ref,) = container["envFrom"]
    (example,) = [d for d in yaml.safe_load_all((K8S / "secret.example.yaml").read_text()) if d]
    assert secret_ref["secretRef"]["name"] == example["metadata"]["name"]
    assert set(example["stringData"]) == {"SWITCHYARD_KAFKA_SASL_USERNAME", "SWITCHYARD_KAFKA_SASL_PASSWORD"}


def test_every_manifest_is_in_the_kustomization():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"]) | {f for g in kustomization["configMapGenerator"] for f in g["files"]}
    present = {p.name for p in K8S.iterdir() if p.suffix in (".yaml", ".toml")} - {"kustomization.yaml"}
    assert present - listed == {"secret.example.yaml"}, "a manifest that kubectl apply -k would leave out"
    assert listed <= present


def test_the_shipped_config_only_uses_settings_switchyard_has():
    defaults = tomllib.loads((REPO / "config" / "switchyard.toml").read_text())
    shipped = tomllib.loads((K8S / "switchyard.toml").read_text())
    for section, values in shipped.items():
        assert section in defaults, section
        for key in values:
            if section == "kafka" and key == "options":
                continue
            assert key in defaults[section], f"{section}.{key}"
    # The Kafka secrets are not in the file.
    assert not any("password" in key for key in shipped["kafka"].get("options", {}))


def test_the_shipped_config_runs_and_the_pod_name_becomes_the_static_member(broker):
    """switchyard run with deploy/kubernetes/switchyard.toml as the pod gets it: only what points at the
    real cluster is replaced (the local broker, PLAINTEXT, replication 1, isolated topics). The Secret's
    variables are set as envFrom sets them (librdkafka refuses unknown options, so their names are
    checked too). Then: ready, the consumer groups' static member is the pod name, SIGTERM exits 0
    within the grace period."""
    from confluent_kafka.admin import AdminClient

    stack = Stack("k8s")
    try:
        sts = next(r for r in render(K8S) if r["kind"] == "StatefulSet")
        pod = sts["spec"]["template"]["spec"]
        (example,) = [d for d in yaml.safe_load_all((K8S / "secret.example.yaml").read_text()) if d]
        pod_name = f"{stack.prefix}-sts-0"
        stack.env.update(example["stringData"])
        stack.env.update({
            "SWITCHYARD_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
            "SWITCHYARD__TOPICS__REPLICATION_FACTOR": "1",
            "SWITCHYARD__SERVICE__INSTANCE_ID": pod_name,
        })
        config_path = str(K8S / "switchyard.toml")
        stack.run_service("--config", config_path)
        assert http_get(f"http://127.0.0.1:{stack.metrics_port}/healthz")[0] == 200

        admin = AdminClient({"bootstrap.servers": broker, "log_level": 0})
        group = f"{stack.prefix}-route"
        deadline, members = time.time() + 30, []
        while time.time() < deadline:
            description = admin.describe_consumer_groups([group])[group].result()
            members = [m.group_instance_id for m in description.members]
            if members:
                break
            time.sleep(1)
        assert members == [pod_name], f"static members of {group}: {members}"

        p = stack.procs["switchyard"]
        started = time.time()
        os.killpg(p.pid, signal.SIGTERM)
        code = p.wait(timeout=pod["terminationGracePeriodSeconds"])
        took = time.time() - started
        assert code == 0, stack.log("switchyard")[-3000:]
        print(f"SIGTERM to exit: {took:.1f} s (grace period {pod['terminationGracePeriodSeconds']} s)")
    finally:
        stack.stop_all()
