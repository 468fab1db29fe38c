# Helpers shared by the scripts that run a local Java service (kafka.sh, registry.sh): messages, the Java
# check, whose process a pid file names, who listens on a port. Sourced, never run.

say() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }
die() { say "error: $*"; exit 1; }

need_java() { # $1: what needs it, for the message
  command -v java >/dev/null || die "java not found: $1 needs Java 17 or newer (apt-get install openjdk-17-jre-headless)"
  local major
  major="$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)"
  [ "${major:-0}" -ge 17 ] || die "java $major found; $1 needs Java 17 or newer"
}

pid_of() { # prints the pid in file $1 if that process runs and its command line contains $2
  [ -f "$1" ] || return 1
  local pid; pid="$(cat "$1")"
  if kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$2"; then
    echo "$pid"; return 0
  fi
  return 1
}

port_owner() { # prints "pid command" of the listener on $1, if any
  ss -ltnpH "sport = :$1" 2>/dev/null | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -1 | while read -r pid; do
    echo "$pid $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-120)"
  done
}
