#!/usr/bin/env bash
# The security suite (tests/security): switchyard against a secured broker (SASL/SCRAM-SHA-512 over TLS,
# ACLs enforced), every role as its own principal with only the ACLs of docs/security.md, refusals
# beyond them, and no password in any output. Starts the secured broker (scripts/kafka_secure.sh) and
# stops it again; reuses one that already runs. Arguments go to pytest.
#
# Environment: SWITCHYARD_BIN (target/debug/switchyard), KAFKA_SECURE_* (see scripts/kafka_secure.sh),
# SECURITY_WORKDIR (where the processes' logs go; a temporary directory otherwise).
# Last line: `security: N passed, M failed`.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo="$(pwd)"

export SWITCHYARD_BIN="${SWITCHYARD_BIN:-target/debug/switchyard}"
case "$SWITCHYARD_BIN" in /*) ;; *) SWITCHYARD_BIN="$repo/$SWITCHYARD_BIN" ;; esac

summary() { echo "security: $1 passed, $2 failed"; }

if [ ! -x "$SWITCHYARD_BIN" ]; then
  echo "test_security.sh: no switchyard binary at $SWITCHYARD_BIN (cargo build, or set SWITCHYARD_BIN)" >&2
  summary 0 1; exit 1
fi

venv=".security/venv"
if [ ! -x "$venv/bin/python" ] || ! cmp -s tests/security/requirements.txt .security/requirements.installed; then
  mkdir -p .security
  rm -rf "$venv"
  if ! { python3 -m venv "$venv" && "$venv/bin/pip" install -q -r tests/security/requirements.txt; }; then
    echo "test_security.sh: could not install tests/security/requirements.txt" >&2
    summary 0 1; exit 1
  fi
  cp tests/security/requirements.txt .security/requirements.installed
fi

started=0
cleanup() { if [ "$started" = 1 ]; then scripts/kafka_secure.sh stop || true; fi; }
trap cleanup EXIT
if ! scripts/kafka_secure.sh status 2>/dev/null; then
  if KAFKA_FRESH=1 scripts/kafka_secure.sh start >/dev/null; then
    started=1
  else
    echo "test_security.sh: the secured broker did not start (see .kafka-secure/logs)" >&2
  fi
fi

report=".security/report.xml"
rm -f "$report"
"$venv/bin/python" -m pytest tests/security -p no:cacheprovider -q -rfE --junitxml="$report" "$@"
code=$?

if [ -f "$report" ]; then
  read -r passed failed < <("$venv/bin/python" - "$report" <<'PY'
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
total = sum(int(s.get("tests", 0)) for s in suites)
failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
print(total - failed - skipped, failed + skipped)
PY
  )
else
  passed=0; failed=1
fi
if [ "$code" != 0 ] && [ "$failed" = 0 ]; then failed=1; fi
cleanup >&2; started=0
summary "$passed" "$failed"
[ "$failed" = 0 ]
