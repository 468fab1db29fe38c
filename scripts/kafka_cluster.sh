#!/usr/bin/env bash
# A local three-node Apache Kafka cluster (KRaft; each node a broker and a controller), shaped like a
# production one: every topic, the offsets and the transaction logs included, has 3 replicas and
# min.insync.replicas 2, so one node may fail without stopping writes. Same jars as scripts/kafka.sh
# (fetched once from Maven Central); its own state and ports. Also `scripts/kafka.sh cluster ...`.
#
#   scripts/kafka_cluster.sh start        format storage if needed, start the three nodes, wait for all
#   scripts/kafka_cluster.sh stop         stop every node (SIGTERM: a controlled shutdown)
#   scripts/kafka_cluster.sh status       say which nodes run
#   scripts/kafka_cluster.sh bootstrap    print the bootstrap servers (127.0.0.1:9192,127.0.0.1:9193,...)
#   scripts/kafka_cluster.sh start-node N start node N (1-3) and wait until it has started
#   scripts/kafka_cluster.sh stop-node N  stop node N with SIGTERM and wait until it has gone
#   scripts/kafka_cluster.sh pid N        print node N's pid (the fault suite sends it SIGKILL, SIGSTOP)
#   scripts/kafka_cluster.sh tool CLASS ARGS...   run a Kafka CLI tool (as scripts/kafka.sh tool)
#
# Node N listens for clients on 127.0.0.1:(KAFKA_CLUSTER_PORT + N - 1) (9192, 9193, 9194) and for the
# controller quorum on KAFKA_CLUSTER_CONTROLLER_PORT + N - 1 (9292, 9293, 9294).
# Environment: KAFKA_CLUSTER_STATE (.kafka-cluster in the repo: node-N/ with config, data, logs, pid),
# KAFKA_CLUSTER_HEAP (512m per node), SWITCHYARD_CACHE, KAFKA_FRESH=1 to wipe every node's data first.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cluster_state="${KAFKA_CLUSTER_STATE:-$(dirname "$here")/.kafka-cluster}"
base_port="${KAFKA_CLUSTER_PORT:-9192}"
base_controller_port="${KAFKA_CLUSTER_CONTROLLER_PORT:-9292}"
nodes=(1 2 3)
KAFKA_HEAP="${KAFKA_CLUSTER_HEAP:-512m}"
# shellcheck source=scripts/kafka.sh
. "$here/kafka.sh"

# Points kafka.sh's lifecycle (state, ports, pid file, log) at node $1.
node() {
  [[ " ${nodes[*]} " == *" $1 "* ]] || die "no node $1 (nodes are ${nodes[*]})"
  node_id="$1"
  state="$cluster_state/node-$1"
  port=$((base_port + $1 - 1))
  controller_port=$((base_controller_port + $1 - 1))
  pidfile="$state/kafka.pid"
  log="$state/logs/server.log"
  broker_name="node $1"
}

voters() {
  local n out=()
  for n in "${nodes[@]}"; do out+=("$n@127.0.0.1:$((base_controller_port + n - 1))"); done
  (IFS=,; echo "${out[*]}")
}

bootstrap() {
  local n out=()
  for n in "${nodes[@]}"; do out+=("127.0.0.1:$((base_port + n - 1))"); done
  (IFS=,; echo "${out[*]}")
}

# The quorum's voters are fixed in the config (controller.quorum.voters): storage is formatted without
# --standalone, every node with the same cluster id.
quorum_format=()
cluster_id() {
  local file="$cluster_state/cluster.id"
  if [ ! -s "$file" ]; then
    mkdir -p "$cluster_state"
    java_cmd kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1 >"$file"
  fi
  grep . "$file" || die "no cluster id in $file"
}

write_config() {
  mkdir -p "$state/data" "$state/logs"
  {
    plaintext_node_props "$node_id" "controller.quorum.voters=$(voters)"
    broker_props "$state/data" 3
  } >"$state/server.properties"
  log4j_props >"$state/log4j2.properties"
}

cluster_start() {
  need_java "Kafka $version"
  fetch
  [ "${KAFKA_FRESH:-0}" = 1 ] && rm -f "$cluster_state/cluster.id"
  local n
  for n in "${nodes[@]}"; do node "$n"; launch; done
  for n in "${nodes[@]}"; do node "$n"; await_ready; done
  say "cluster ready: $(bootstrap)"
}

cluster_stop() {
  local n
  for n in "${nodes[@]}"; do node "$n"; stop; done
}

cluster_status() {
  local n up=0
  for n in "${nodes[@]}"; do
    node "$n"
    if pid="$(running_pid)" && answering; then say "node $n running (pid $pid) on 127.0.0.1:$port"; up=$((up + 1))
    else say "node $n not running"; fi
  done
  [ "$up" = "${#nodes[@]}" ]
}

case "${1:-}" in
  start) cluster_start ;;
  stop) cluster_stop ;;
  status) cluster_status ;;
  bootstrap) bootstrap ;;
  start-node) node "${2:?start-node N}"; need_java "Kafka $version"; launch; await_ready ;;
  stop-node) node "${2:?stop-node N}"; stop ;;
  pid) node "${2:?pid N}"; running_pid || die "node $2 is not running" ;;
  tool) shift; need_java "Kafka $version"; fetch; node 1; [ -f "$state/log4j2.properties" ] || write_config; java_cmd "$@" ;;
  *) sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
