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
cargo test --locked "$@"
