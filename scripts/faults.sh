#!/usr/bin/env bash
# The fault suite (scripts/faults/faults.py): real broker, real switchyard processes, crashes and
# restarts, then the delivery invariants checked by an independent client. Arguments go to faults.py,
# e.g. `scripts/faults.sh kill9_instance --rate 300 --duration 30`.
# `scripts/faults.sh --cluster [SCENARIO...]` runs the broker-fault scenarios on the local three-node
# cluster (scripts/kafka_cluster.sh: replication factor 3, min.insync.replicas 2) instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv=".faults/venv"
if [ ! -x "$venv/bin/python" ]; then
  mkdir -p .faults
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r scripts/faults/requirements.txt
fi
cargo build --locked --quiet

kafka=scripts/kafka.sh
if [ "${1:-}" = --cluster ]; then
  kafka=scripts/kafka_cluster.sh
  SWITCHYARD_BOOTSTRAP_SERVERS="$("$kafka" bootstrap)"
  export SWITCHYARD_BOOTSTRAP_SERVERS
fi
started=0
cleanup() { if [ "$started" = 1 ]; then "$kafka" stop || true; fi; }
trap cleanup EXIT
if ! "$kafka" status 2>/dev/null; then
  KAFKA_FRESH=1 "$kafka" start
  started=1
fi
"$venv/bin/python" scripts/faults/faults.py "$@"
