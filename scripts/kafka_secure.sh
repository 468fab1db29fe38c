#!/usr/bin/env bash
# A second local single-node Apache Kafka (KRaft) with security on: SASL/SCRAM-SHA-512 over TLS for
# clients, least-privilege ACLs enforced (StandardAuthorizer, nothing allowed without an ACL). Same
# Kafka jars as scripts/kafka.sh (fetched once from Maven Central); its own state, ports and secrets.
#
#   scripts/kafka_secure.sh start     make a CA, a broker certificate and the admin's SCRAM credentials
#                                     (first start), format storage, start the broker, print how to connect
#   scripts/kafka_secure.sh stop      stop the broker started by this script
#   scripts/kafka_secure.sh status    say whether it runs
#   scripts/kafka_secure.sh tool CLASS ARGS...   run a Kafka CLI tool, e.g. kafka-acls.sh:
#       scripts/kafka_secure.sh tool org.apache.kafka.tools.AclCommand \
#         --bootstrap-server 127.0.0.1:19092 --command-config .kafka-secure/admin.properties --list
#
# Listeners (all on 127.0.0.1): SASL_SSL for clients (KAFKA_SECURE_PORT, 19092); INTERNAL, the broker's
# own listener, and CONTROLLER (KAFKA_SECURE_INTERNAL_PORT 19094, KAFKA_SECURE_CONTROLLER_PORT 19093):
# TLS with client certificates, for the broker alone (principal User:switchyard-broker).
# Environment: KAFKA_SECURE_STATE (.kafka-secure in the repo: config, certificates, secrets, data, logs),
# SWITCHYARD_CACHE, KAFKA_SECURE_HEAP (512m), KAFKA_FRESH=1 to wipe everything (data, CA, passwords) first.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The broker's lifecycle is scripts/kafka.sh's (the same jars, fetched once; start, stop, status), with
# this broker's state, ports, config and hooks.
KAFKA_STATE="${KAFKA_SECURE_STATE:-$(dirname "$here")/.kafka-secure}"
KAFKA_PORT="${KAFKA_SECURE_PORT:-19092}"
KAFKA_CONTROLLER_PORT="${KAFKA_SECURE_CONTROLLER_PORT:-19093}"
KAFKA_HEAP="${KAFKA_SECURE_HEAP:-512m}"
# shellcheck source=scripts/kafka.sh
. "$here/kafka.sh"
internal_port="${KAFKA_SECURE_INTERNAL_PORT:-19094}"
tls="$state/tls"
secrets="$state/secrets"
broker_cn="switchyard-broker"
broker_name="secure broker"
extra_ports=("$internal_port")

secret() { # prints the secret named $1, making it on first use
  local file="$secrets/$1"
  if [ ! -s "$file" ]; then
    (umask 077; openssl rand -hex 24 >"$file")
  fi
  cat "$file"
}

# A CA, and a broker certificate it signs (server and client use: the broker presents it on every
# listener and to its own controller), as PEM files and a PKCS12 keystore.
make_tls() {
  [ -f "$tls/broker.p12" ] && [ -f "$tls/ca.pem" ] && return 0
  command -v openssl >/dev/null || die "openssl not found (apt-get install openssl)"
  mkdir -p "$tls"; chmod 700 "$tls"
  (
    umask 077
    cd "$tls"
    openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 825 -keyout ca.key -out ca.pem \
      -subj "/CN=switchyard local CA $(date +%s)" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -sha256 -keyout broker.key -out broker.csr -subj "/CN=$broker_cn" 2>/dev/null
    printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
      "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=DNS:localhost,IP:127.0.0.1" >broker.ext
    openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 -sha256 \
      -extfile broker.ext -out broker.pem 2>/dev/null
    openssl pkcs12 -export -in broker.pem -inkey broker.key -certfile ca.pem -name broker \
      -passout "file:$secrets/keystore" -out broker.p12
    rm -f broker.csr broker.ext ca.srl
    chmod 644 ca.pem
  )
  say "made a CA ($tls/ca.pem) and a broker certificate for 127.0.0.1/localhost"
}

write_config() {
  mkdir -p "$state/data" "$state/logs"
  local keystore_password; keystore_password="$(secret keystore)"
  (umask 077; cat >"$state/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$controller_port
listeners=SASL_SSL://127.0.0.1:$port,INTERNAL://127.0.0.1:$internal_port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=SASL_SSL://127.0.0.1:$port,INTERNAL://127.0.0.1:$internal_port
controller.listener.names=CONTROLLER
inter.broker.listener.name=INTERNAL
listener.security.protocol.map=SASL_SSL:SASL_SSL,INTERNAL:SSL,CONTROLLER:SSL

# TLS: one broker certificate (CN=$broker_cn, SAN 127.0.0.1 and localhost) signed by the local CA.
ssl.keystore.type=PKCS12
ssl.keystore.location=$tls/broker.p12
ssl.keystore.password=$keystore_password
ssl.key.password=$keystore_password
ssl.truststore.type=PEM
ssl.truststore.location=$tls/ca.pem
# The broker's own listeners take only clients with a certificate from the CA (the broker itself).
listener.name.internal.ssl.client.auth=required
listener.name.controller.ssl.client.auth=required
ssl.principal.mapping.rules=RULE:^CN=([^,]+)$/\$1/,DEFAULT

# Clients: SASL/SCRAM-SHA-512 over TLS. Credentials live in the cluster metadata (kafka-configs.sh, or
# kafka-storage.sh format --add-scram for the first ones).
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;

# Nothing without an ACL; the broker and the admin may do everything.
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:$broker_cn;User:admin

$(broker_props "$state/data")
PROPS
  )
  { log4j_props; cat <<PROPS; } >"$state/log4j2.properties"
appender.authorizer.type = File
appender.authorizer.name = authorizer
appender.authorizer.fileName = $state/logs/authorizer.log
appender.authorizer.layout.type = PatternLayout
appender.authorizer.layout.pattern = [%d] %p %m%n
# Every denied request (INFO) names the principal, operation and resource: how to find a missing ACL.
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = info
logger.authorizer.additivity = false
logger.authorizer.appenderRef.authorizer.ref = authorizer
PROPS
  # Client settings for the admin: Java tools (--command-config) and switchyard (environment).
  local admin_password; admin_password="$(secret admin.password)"
  (umask 077; cat >"$state/admin.properties" <<PROPS
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$admin_password";
ssl.truststore.type=PEM
ssl.truststore.location=$tls/ca.pem
PROPS
  cat >"$state/admin.env" <<PROPS
SWITCHYARD_BOOTSTRAP_SERVERS=127.0.0.1:$port
SWITCHYARD_KAFKA_SECURITY_PROTOCOL=SASL_SSL
SWITCHYARD_KAFKA_SASL_MECHANISM=SCRAM-SHA-512
SWITCHYARD_KAFKA_SASL_USERNAME=admin
SWITCHYARD_KAFKA_SASL_PASSWORD=$admin_password
SWITCHYARD_KAFKA_SSL_CA_LOCATION=$tls/ca.pem
PROPS
  )
}

# Before the config is written: a fresh start wipes the CA and passwords too; the keystore password, the
# CA and the certificates exist; the admin's SCRAM credentials go into the bootstrap metadata (the
# first client can log in).
prepare() {
  if [ "${KAFKA_FRESH:-0}" = 1 ]; then
    rm -rf "$tls" "$secrets" "$state/admin.properties" "$state/admin.env"
  fi
  mkdir -p "$secrets"; chmod 700 "$state" "$secrets"
  secret keystore >/dev/null
  make_tls
  format_args=(--add-scram "SCRAM-SHA-512=[name=admin,password=$(secret admin.password)]")
}

on_ready() { connect_help; }

connect_help() {
  cat <<HELP
Secured broker: SASL_SSL on 127.0.0.1:$port, SCRAM-SHA-512, TLS certificate from the CA $tls/ca.pem.
Super user: admin (password in $secrets/admin.password; nothing else is allowed without an ACL).
  switchyard as admin:  set -a; . $state/admin.env; set +a; target/debug/switchyard status
  (SWITCHYARD_BOOTSTRAP_SERVERS=127.0.0.1:$port SWITCHYARD_KAFKA_SECURITY_PROTOCOL=SASL_SSL
   SWITCHYARD_KAFKA_SASL_MECHANISM=SCRAM-SHA-512 SWITCHYARD_KAFKA_SASL_USERNAME=...
   SWITCHYARD_KAFKA_SASL_PASSWORD=... SWITCHYARD_KAFKA_SSL_CA_LOCATION=$tls/ca.pem)
  Kafka tools:  --bootstrap-server 127.0.0.1:$port --command-config $state/admin.properties
  users and ACLs per role: docs/security.md
HELP
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if pid="$(running_pid)" && answering; then say "running (pid $pid) on 127.0.0.1:$port (SASL_SSL)"; else say "not running"; exit 1; fi ;;
  tool) shift; need_java "Kafka $version"; fetch; [ -f "$state/log4j2.properties" ] || die "start the secure broker first (its config is made then)"; java_cmd "$@" ;;
  *) sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
