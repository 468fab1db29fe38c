#!/usr/bin/env bash
# Runs every test: unit and property tests, the published cohort-hash vectors, and the integration tests
# against a real Kafka broker. Starts the local broker (scripts/kafka.sh) unless SWITCHYARD_TEST_BOOTSTRAP
# points at one, and stops what it started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

started=0
cleanup() { if [ "$started" = 1 ]; then scripts/kafka.sh stop || true; fi; }
trap cleanup EXIT

if [ -z "${SWITCHYARD_TEST_BOOTSTRAP:-}" ]; then
  if ! scripts/kafka.sh status 2>/dev/null; then
    KAFKA_FRESH=1 scripts/kafka.sh start
    started=1
  fi
fi
log="$(mktemp)"
status=0
cargo test --locked "$@" 2>&1 | tee "$log" || status=$?
cleanup
started=0
# One closing line for the whole run: the sum of every test binary's summary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
rm -f "$log"
exit "$status"
