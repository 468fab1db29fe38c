#!/usr/bin/env bash
# Runs every test: unit and property tests, the published cohort-hash vectors, the decoder corpus, the
# integration tests against a real Kafka broker (and a real schema registry), the Python suites (the
# model-worker kit, the platform: Kubernetes, Grafana, kcat; security: SASL_SSL and ACLs), and the fault suite (scripts/faults.sh: crashes,
# restarts, rebalances, broker failure, checked by an independent client; then broker faults on a
# three-node cluster). Starts the local broker
# (scripts/kafka.sh) unless SWITCHYARD_TEST_BOOTSTRAP points at one, and a schema registry
# (scripts/registry.sh: Apicurio, built from Maven Central) unless SWITCHYARD_TEST_REGISTRY points at
# one; stops what it started.
# SWITCHYARD_SKIP_FAULTS=1 leaves the fault suite out.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

started=0
registry_started=0
cleanup() {
  if [ "$registry_started" = 1 ]; then scripts/registry.sh stop || true; registry_started=0; fi
  if [ "$started" = 1 ]; then scripts/kafka.sh stop || true; started=0; fi
}
trap cleanup EXIT

if [ -n "${SWITCHYARD_TEST_BOOTSTRAP:-}" ]; then
  export SWITCHYARD_BOOTSTRAP_SERVERS="$SWITCHYARD_TEST_BOOTSTRAP"
elif ! scripts/kafka.sh status 2>/dev/null; then
  KAFKA_FRESH=1 scripts/kafka.sh start
  started=1
fi
if [ -z "${SWITCHYARD_TEST_REGISTRY:-}" ]; then
  if url="$(scripts/registry.sh status 2>/dev/null)"; then
    export SWITCHYARD_TEST_REGISTRY="$url"
  else
    SWITCHYARD_TEST_REGISTRY="$(scripts/registry.sh start)"
    export SWITCHYARD_TEST_REGISTRY
    registry_started=1
  fi
fi

log="$(mktemp)"
status=0
cargo test --locked "$@" 2>&1 | tee "$log" || status=$?
if [ "${SWITCHYARD_SKIP_FAULTS:-0}" != 1 ]; then
  scripts/faults.sh --duration 12 2>&1 | tee -a "$log" || status=1
fi
# The Python suites, each installing its own pinned venv: the model-worker kit end to end (python/),
# the platform (Kubernetes manifests, the Grafana dashboard's metrics, the kcat recipes), security (a
# second broker with SASL/SCRAM over TLS and ACLs enforced, started and stopped by the suite).
for suite in scripts/test_python.sh scripts/test_platform.sh scripts/test_security.sh; do
  "$suite" 2>&1 | tee -a "$log" || status=1
done
cleanup
# Broker faults on the three-node cluster (scripts/kafka_cluster.sh, replication factor 3,
# min.insync.replicas 2; started and stopped by faults.sh): the transaction and group coordinators'
# node killed, and a rolling restart of every node. The other cluster scenarios: docs/faults.md.
if [ "${SWITCHYARD_SKIP_FAULTS:-0}" != 1 ]; then
  scripts/faults.sh --cluster --duration 30 cluster_coordinator_kill9 cluster_rolling_restart 2>&1 | tee -a "$log" || status=1
fi

# One closing line for the whole run: every cargo test binary's summary plus the fault scenarios.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     /^(faults|python-kit|platform|security): [0-9]+ passed, [0-9]+ failed$/ { p += $2; f += $4 }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
rm -f "$log"
exit "$status"
