#!/usr/bin/env bash
# The fault suite (scripts/faults/faults.py): real broker, real switchyard processes, crashes and
# restarts, then the delivery invariants checked by an independent client. Arguments go to faults.py,
# e.g. `scripts/faults.sh kill9_instance --rate 300 --duration 30`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv=".faults/venv"
if [ ! -x "$venv/bin/python" ]; then
  mkdir -p .faults
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r scripts/faults/requirements.txt
fi
cargo build --locked --quiet

started=0
cleanup() { if [ "$started" = 1 ]; then scripts/kafka.sh stop || true; fi; }
trap cleanup EXIT
if ! scripts/kafka.sh status 2>/dev/null; then
  KAFKA_FRESH=1 scripts/kafka.sh start
  started=1
fi
"$venv/bin/python" scripts/faults/faults.py "$@"
