#!/usr/bin/env bash
# A local single-node Apache Kafka (KRaft) for development, demos, tests and CI — no Docker needed.
#
#   scripts/kafka.sh fetch     resolve the broker and CLI tool jars from Maven Central (cached)
#   scripts/kafka.sh start     format storage if needed, start the broker, wait until it answers
#   scripts/kafka.sh stop      stop the broker started by this script
#   scripts/kafka.sh status    say whether it runs
#   scripts/kafka.sh cluster start|stop|...   a three-node cluster instead (scripts/kafka_cluster.sh)
#   scripts/kafka.sh tool CLASS ARGS...   run a Kafka CLI tool, e.g.
#       scripts/kafka.sh tool kafka.tools.ConsoleConsumer ... (see docs/operations.md)
#
# Environment: KAFKA_PORT (9092), KAFKA_CONTROLLER_PORT (9093), KAFKA_STATE (.kafka in the repo: config,
# data, logs, pid), SWITCHYARD_CACHE (~/.cache/switchyard: the jars), KAFKA_HEAP (1g), KAFKA_FRESH=1 to
# wipe the data directory before starting.
#
# Sourced (scripts/kafka_secure.sh does), it defines the broker's lifecycle without running anything: the
# sourcing script sets the KAFKA_* variables first, then may replace write_config and set the hooks
# below (extra_ports, format_args, prepare, on_ready, broker_name).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
pom="$here/kafka/pom.xml"
version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom")"
cache="${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}"
lib="$cache/kafka-$version/lib"
state="${KAFKA_STATE:-$repo/.kafka}"
port="${KAFKA_PORT:-9092}"
controller_port="${KAFKA_CONTROLLER_PORT:-9093}"
pidfile="$state/kafka.pid"
log="$state/logs/server.log"
heap="${KAFKA_HEAP:-1g}"

# Hooks for a script that sources this one: more ports the broker listens on, more arguments for
# formatting its storage, a step before its config is written, one once it answers, its name in messages.
extra_ports=()
format_args=()
# How storage is formatted: a single node is its own controller quorum.
quorum_format=(--standalone)
cluster_id() { java_cmd kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1 | grep . || die "kafka.tools.StorageTool random-uuid printed nothing"; }
prepare() { :; }
on_ready() { :; }
broker_name="broker"

. "$here/services.sh"
running_pid() { pid_of "$pidfile" kafka.Kafka; }

fetch() {
  if [ -f "$lib/.complete" ]; then return 0; fi
  command -v mvn >/dev/null || die "mvn not found: it fetches Kafka's jars (apt-get install maven)"
  say "fetching Kafka $version jars from Maven Central into $lib"
  rm -rf "$lib"; mkdir -p "$lib"
  if ! mvn -B -q -f "$pom" dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$lib" >"$cache/mvn-$version.log" 2>&1; then
    tail -30 "$cache/mvn-$version.log" >&2
    die "Maven could not resolve Kafka $version (full log: $cache/mvn-$version.log)"
  fi
  ls "$lib"/kafka_2.13-"$version".jar >/dev/null 2>&1 || die "kafka_2.13-$version.jar missing after fetch"
  touch "$lib/.complete"
}

answering() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

# The settings of a broker for development and tests, with its data in $1, its topics (the offsets and
# transaction logs included) with $2 replicas (default 1) and min.insync.replicas 2 when there are more
# (shared with scripts/kafka_secure.sh and scripts/kafka_cluster.sh, which source this script).
broker_props() {
  local replicas="${2:-1}" in_sync=1
  [ "$replicas" -gt 1 ] && in_sync=2
  cat <<PROPS
log.dirs=$1
num.partitions=4
default.replication.factor=$replicas
min.insync.replicas=$in_sync
auto.create.topics.enable=false
offsets.topic.replication.factor=$replicas
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=$replicas
transaction.state.log.min.isr=$in_sync
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=$replicas
share.coordinator.state.topic.min.isr=$in_sync
group.initial.rebalance.delay.ms=0
log.cleaner.min.compaction.lag.ms=0
# Compaction tests need the cleaner to look often (default 15 s).
log.cleaner.backoff.ms=1000
PROPS
}

# A node that is broker and controller, node id $1, on PLAINTEXT $port and CONTROLLER $controller_port,
# with its quorum given by $2 (a controller.quorum.* line).
plaintext_node_props() {
  cat <<PROPS
process.roles=broker,controller
node.id=$1
$2
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
PROPS
}

# Log4j settings: the broker's log in $log (a sourcing script may append appenders and loggers).
log4j_props() {
  cat <<PROPS
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = $log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = info
logger.org.name = org.apache.kafka
logger.org.level = info
PROPS
}

write_config() {
  mkdir -p "$state/data" "$state/logs"
  {
    plaintext_node_props 1 "controller.quorum.bootstrap.servers=127.0.0.1:$controller_port"
    broker_props "$state/data"
  } >"$state/server.properties"
  log4j_props >"$state/log4j2.properties"
}

java_cmd() { java -Xms256m -Xmx"$heap" -XX:+UseG1GC -Dlog4j2.configurationFile="$state/log4j2.properties" -cp "$lib/*" "$@"; }

# Formats storage if needed and starts the broker process, without waiting for it (a cluster's nodes
# wait for each other: none is ready before a quorum of controllers runs).
launch() {
  if pid="$(running_pid)"; then
    answering && return 0
    die "a broker from an earlier run (pid $pid) holds $state but does not answer on port $port: run $(basename "$0") stop"
  fi
  rm -f "$pidfile"
  for p in "$port" "$controller_port" "${extra_ports[@]}"; do
    owner="$(port_owner "$p")"
    [ -z "$owner" ] || die "port $p is already in use by pid $owner; stop it or choose another (see $(basename "$0") --help)"
  done
  [ "${KAFKA_FRESH:-0}" = 1 ] && rm -rf "$state/data"
  prepare
  write_config
  if [ ! -f "$state/data/meta.properties" ]; then
    local id; id="$(cluster_id)"
    java_cmd kafka.tools.StorageTool format "${quorum_format[@]}" -t "$id" -c "$state/server.properties" "${format_args[@]}" \
      >"$state/logs/format.log" 2>&1 || { cat "$state/logs/format.log" >&2; die "formatting storage in $state/data failed"; }
  fi
  : >"$log"
  nohup java -Xms256m -Xmx"$heap" -XX:+UseG1GC -Dlog4j2.configurationFile="$state/log4j2.properties" \
    -cp "$lib/*" kafka.Kafka "$state/server.properties" >"$state/logs/stdout.log" 2>&1 &
  echo $! >"$pidfile"
  say "starting $broker_name: Kafka $version (pid $(cat "$pidfile")), logs in $state/logs"
}

# Waits until the broker launched from $state answers and has started.
await_ready() {
  local pid; pid="$(cat "$pidfile")"
  for _ in $(seq 1 120); do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -40 "$log" "$state/logs/stdout.log" >&2 || true
      rm -f "$pidfile"
      die "the broker exited during startup (see above and $state/logs)"
    fi
    if grep -q "Kafka Server started" "$log" 2>/dev/null && answering; then
      say "$broker_name ready on 127.0.0.1:$port"
      on_ready
      return 0
    fi
    sleep 0.5
  done
  tail -40 "$log" >&2 || true
  die "the broker did not become ready within 60 s (pid $pid still running; see $log)"
}

start() {
  need_java "Kafka $version"
  fetch
  if pid="$(running_pid)" && answering; then say "$broker_name already running (pid $pid) on 127.0.0.1:$port; reusing it"; on_ready; return 0; fi
  launch
  await_ready
}

stop() {
  local pid
  if ! pid="$(running_pid)"; then rm -f "$pidfile"; say "no broker running from $state"; return 0; fi
  kill -TERM "$pid"
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; say "$broker_name stopped"; return 0; }
    sleep 0.5
  done
  say "broker did not stop within 30 s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

# Sourced: definitions only.
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0

case "${1:-}" in
  fetch) need_java "Kafka $version"; fetch ;;
  start) start ;;
  stop) stop ;;
  status) if pid="$(running_pid)" && answering; then say "running (pid $pid) on 127.0.0.1:$port"; else say "not running"; exit 1; fi ;;
  cluster) shift; exec "$here/kafka_cluster.sh" "$@" ;;
  tool) shift; need_java "Kafka $version"; fetch; [ -f "$state/log4j2.properties" ] || write_config; java_cmd "$@" ;;
  *) sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
