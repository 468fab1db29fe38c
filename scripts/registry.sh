#!/usr/bin/env bash
# A local Confluent-API-compatible Schema Registry (Apicurio Registry, built from Maven Central) for
# development, tests and CI — no Docker needed. Its Confluent API is under /apis/ccompat/v7.
#
#   scripts/registry.sh fetch    resolve and build the registry (cached; measured 21 s with an empty Maven repository)
#   scripts/registry.sh start    build if needed, start it on 127.0.0.1, wait until it answers,
#                                print its Confluent-compatible base URL on stdout
#   scripts/registry.sh stop     stop the registry started by this script
#   scripts/registry.sh status   print the base URL and exit 0 if it runs, else exit 1
#
# Environment: REGISTRY_PORT (8081), REGISTRY_STATE (.registry in the repo: build, pid, log),
# REGISTRY_DATA (unset: schemas live in memory and a restart forgets them; a directory: an H2 file
# database there, kept across restarts), REGISTRY_HEAP (256m). Needs Java 17+ and Maven.
# A schema's id follows its exact text: register the same text to get the same id. (Apicurio's
# canonical-hash mode, which would match texts that differ only in layout, is left off: this
# version's canonical form sorts an Avro record's fields by name, which changes the schema.)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
pom="$here/registry/pom.xml"
settings="$here/registry/settings.xml"
version="$(sed -n 's:.*<apicurio.version>\(.*\)</apicurio.version>.*:\1:p' "$pom")"
state="${REGISTRY_STATE:-$repo/.registry}"
build="$state/build"
jar="$build/target/quarkus-app/quarkus-run.jar"
port="${REGISTRY_PORT:-8081}"
pidfile="$state/registry.pid"
log="$state/registry.log"
base="http://127.0.0.1:$port/apis/ccompat/v7"

. "$here/services.sh"
running_pid() { pid_of "$pidfile" "$jar"; }

fetch() {
  local stamp
  stamp="$(cat "$pom" "$settings" | sha256sum | cut -c1-16)"
  if [ -f "$jar" ] && [ "$(cat "$build/.complete" 2>/dev/null)" = "$stamp" ]; then return 0; fi
  command -v mvn >/dev/null || die "mvn not found: it fetches and builds the registry (apt-get install maven)"
  say "building Apicurio Registry $version from Maven Central into $build (first time: about 20 s plus downloads)"
  rm -rf "$build"; mkdir -p "$build"
  cp "$pom" "$build/pom.xml"
  if ! (cd "$build" && mvn -B -s "$settings" package -DskipTests -Dquarkus.package.type=fast-jar) >"$state/build.log" 2>&1; then
    grep -v 'Progress\|Download' "$state/build.log" | tail -30 >&2
    die "building the registry failed (full log: $state/build.log)"
  fi
  [ -f "$jar" ] || die "$jar missing after the build (see $state/build.log)"
  echo "$stamp" >"$build/.complete"
}

# Ready: the health check says UP and the Confluent API answers.
answering() {
  curl -sf -m 2 -o /dev/null "http://127.0.0.1:$port/health/ready" 2>/dev/null &&
    curl -sf -m 2 -o /dev/null "$base/subjects" 2>/dev/null
}

start() {
  need_java "the registry"
  command -v curl >/dev/null || die "curl not found (apt-get install curl)"
  fetch
  if pid="$(running_pid)"; then
    if answering; then say "registry already running (pid $pid); reusing it"; echo "$base"; return 0; fi
    die "a registry from an earlier run (pid $pid) does not answer on port $port: run scripts/registry.sh stop"
  fi
  rm -f "$pidfile"
  owner="$(port_owner "$port")"
  [ -z "$owner" ] || die "port $port is already in use by pid $owner; stop it or choose REGISTRY_PORT"
  local datasource="jdbc:h2:mem:registry_db"
  if [ -n "${REGISTRY_DATA:-}" ]; then
    mkdir -p "$REGISTRY_DATA"
    datasource="jdbc:h2:file:$(cd "$REGISTRY_DATA" && pwd)/registry"
  fi
  mkdir -p "$state"
  : >"$log"
  # Settings are the app's own (its application.properties); the environment names are Apicurio's.
  REGISTRY_DATASOURCE_URL="$datasource" ENABLE_CCOMPAT_CANONICAL_HASH_MODE=false \
    nohup java -Xms64m -Xmx"${REGISTRY_HEAP:-256m}" -XX:+UseSerialGC \
    -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port="$port" \
    '-Dquarkus.log.category."io.apicurio.common.apps.logging.audit".level=WARN' \
    '-Dquarkus.log.category."io.sentry".level=ERROR' \
    -jar "$jar" >"$log" 2>&1 &
  echo $! >"$pidfile"
  local pid; pid="$(cat "$pidfile")"
  say "starting Apicurio Registry $version (pid $pid) on 127.0.0.1:$port, log in $log"
  for _ in $(seq 1 180); do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -40 "$log" >&2 || true
      rm -f "$pidfile"
      die "the registry exited during startup (see above and $log)"
    fi
    if answering; then
      say "registry ready: $base"
      echo "$base"
      return 0
    fi
    sleep 0.5
  done
  tail -40 "$log" >&2 || true
  die "the registry did not become ready within 90 s (pid $pid still running; see $log)"
}

stop() {
  local pid
  if ! pid="$(running_pid)"; then rm -f "$pidfile"; say "no registry running from $state"; return 0; fi
  kill -TERM "$pid"
  for _ in $(seq 1 40); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; say "registry stopped"; return 0; }
    sleep 0.5
  done
  say "registry did not stop within 20 s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

case "${1:-}" in
  fetch) need_java "the registry"; mkdir -p "$state"; fetch ;;
  start) start ;;
  stop) stop ;;
  status) if pid="$(running_pid)" && answering; then say "running (pid $pid)"; echo "$base"; else say "not running"; exit 1; fi ;;
  *) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
