#!/usr/bin/env bash
# Platform tests (tests/platform, pytest): the Kubernetes manifests (deploy/kubernetes) rendered with
# kustomize and validated against the Kubernetes JSON schemas and the ServiceMonitor CRD's schema; the
# Grafana dashboard (deploy/grafana) against a running switchyard's /metrics; the kcat recipes of
# docs/kcat.md run against the broker. Installs what it needs: a venv in .platform/venv (pinned
# requirements), the CRD validator from npm (pinned lock file) in .platform/crd, and kcat (apt) if
# missing. Uses the broker at SWITCHYARD_BOOTSTRAP_SERVERS (default 127.0.0.1:9092; starts the local
# one with scripts/kafka.sh if none runs there, and stops what it started), and the binary at
# SWITCHYARD_BIN (default target/debug/switchyard; not built here). Arguments go to pytest.
# Last line: "platform: N passed, M failed".
set -euo pipefail
if [ -n "${SWITCHYARD_BIN:-}" ]; then SWITCHYARD_BIN="$(realpath -m "$SWITCHYARD_BIN")"; fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export SWITCHYARD_BIN="${SWITCHYARD_BIN:-$PWD/target/debug/switchyard}"

venv=.platform/venv
requirements=tests/platform/requirements.txt
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$requirements" "$venv/requirements.txt"; then
  mkdir -p .platform
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$venv/requirements.txt"
fi

crd=.platform/crd
if [ ! -d "$crd/node_modules" ] || ! cmp -s tests/platform/crd/package-lock.json "$crd/package-lock.json"; then
  mkdir -p "$crd"
  cp tests/platform/crd/package.json tests/platform/crd/package-lock.json "$crd/"
  (cd "$crd" && npm ci --no-audit --no-fund --silent)
fi
cp tests/platform/crd/validate.mjs "$crd/"

if ! command -v kcat >/dev/null 2>&1; then
  sudo=""; if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  { $sudo apt-get install -y -q kcat || { $sudo apt-get update -q && $sudo apt-get install -y -q kcat; }; } >/dev/null 2>&1 \
    || echo "test_platform: could not install kcat (apt-get install -y kcat); its tests will fail or skip"
fi

started=0
cleanup() { if [ "$started" = 1 ]; then scripts/kafka.sh stop || true; started=0; fi; }
trap cleanup EXIT
if [ -z "${SWITCHYARD_BOOTSTRAP_SERVERS:-}" ] && ! scripts/kafka.sh status >/dev/null 2>&1; then
  KAFKA_FRESH=1 scripts/kafka.sh start
  started=1
fi

log="$(mktemp)"
status=0
"$venv/bin/python" -m pytest tests/platform -q -rfEs -o cache_dir=.platform/pytest-cache "$@" 2>&1 | tee "$log" \
  || status=$?
cleanup

# pytest's closing line, e.g. "3 failed, 20 passed, 1 skipped, 2 errors in 61.20s": errors count as failures.
summary="$(grep -E '^=*\s*[0-9]+ (passed|failed|skipped|errors?|deselected)' "$log" | tail -1 || true)"
rm -f "$log"
count() { echo "$summary" | grep -oE "[0-9]+ $1" | grep -oE '^[0-9]+' || echo 0; }
passed="$(count passed)"
failed=$(( $(count failed) + $(count 'errors?') ))
if [ "$status" != 0 ] && [ "$failed" = 0 ]; then failed=1; fi
echo "platform: $passed passed, $failed failed"
exit "$status"
