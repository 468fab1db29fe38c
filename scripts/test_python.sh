#!/usr/bin/env bash
# The Python model-worker kit (python/): unit tests, and end-to-end tests against the local broker and the
# real switchyard binary (SWITCHYARD_BIN, default target/debug/switchyard): a canary whose candidate is the
# scikit-learn example worker, errors in the model function, SIGTERM and kill -9 mid-stream, the Confluent
# framing, and the Schema Registry (switchyard and the kit both on a real registry).
# Needs a broker at SWITCHYARD_BOOTSTRAP_SERVERS (default 127.0.0.1:9092; scripts/kafka.sh start); without
# one the broker tests fail when CI is set and are skipped otherwise. The registry: SWITCHYARD_TEST_REGISTRY
# (its Confluent API base URL) if set, else the one scripts/registry.sh runs (REGISTRY_PORT, REGISTRY_STATE),
# else one started here with scripts/registry.sh and stopped at the end; without one the registry tests
# fail when CI is set and are skipped otherwise. Installs pinned requirements into .python-kit/venv.
# Arguments go to pytest. Last line: python-kit: N passed, M failed
# `scripts/test_python.sh --setup` only prepares the venv with the kit (scripts/demo.sh uses it).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo="$(pwd)"
export SWITCHYARD_BIN="${SWITCHYARD_BIN:-target/debug/switchyard}"

venv=".python-kit/venv"
stamp="$venv/.requirements.sha256"
want="$(sha256sum python/requirements.txt | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  rm -rf "$venv"
  mkdir -p .python-kit
  if ! python3 -m venv "$venv" || ! "$venv/bin/pip" install -q -r python/requirements.txt; then
    echo "python-kit: 0 passed, 1 failed"
    exit 1
  fi
  echo "$want" >"$stamp"
fi
# The kit itself, fresh from the source every run.
if ! "$venv/bin/pip" install -q --no-deps --no-build-isolation --force-reinstall ./python/switchyard-worker; then
  echo "python-kit: 0 passed, 1 failed"
  exit 1
fi

if [ "${1:-}" = "--setup" ]; then exit 0; fi

registry_started=0
stop_registry() {
  if [ "$registry_started" = 1 ]; then scripts/registry.sh stop >/dev/null 2>&1 || true; registry_started=0; fi
}
trap stop_registry EXIT
if [ -z "${SWITCHYARD_TEST_REGISTRY:-}" ]; then
  if url="$(scripts/registry.sh status 2>/dev/null)"; then
    export SWITCHYARD_TEST_REGISTRY="$url"
  elif url="$(scripts/registry.sh start)"; then
    export SWITCHYARD_TEST_REGISTRY="$url"
    registry_started=1
  else
    echo "test_python.sh: no schema registry could be started; its tests fail under CI and are skipped otherwise" >&2
  fi
fi

rm -rf .python-kit/logs   # the previous run's process logs
log="$(mktemp)"
(cd python && timeout 1500 "$repo/$venv/bin/python" -m pytest "$@") 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
summary="$(grep -E '(passed|failed|errors?|skipped|no tests ran).* in [0-9.]+s' "$log" | tail -1)"
rm -f "$log"
passed="$(grep -oE '[0-9]+ passed' <<<"$summary" | cut -d' ' -f1)"
failed="$(grep -oE '[0-9]+ failed' <<<"$summary" | cut -d' ' -f1)"
errors="$(grep -oE '[0-9]+ errors?' <<<"$summary" | cut -d' ' -f1)"
passed="${passed:-0}"; failed=$(( ${failed:-0} + ${errors:-0} ))
if [ "$status" != 0 ] && [ "$failed" = 0 ]; then failed=1; fi   # crashed, timed out, or ran nothing
stop_registry   # before the last line
echo "python-kit: $passed passed, $failed failed"
exit "$status"
