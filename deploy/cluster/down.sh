#!/usr/bin/env bash
# Stops what up.sh started in $DIR (default ./baton-cluster): controllers,
# then NATS, then PostgreSQL (fast shutdown). The state stays; `rm -rf $DIR`
# forgets it.
set -uo pipefail
DIR=${DIR:-$PWD/baton-cluster}
stop() { # name, signal
  local pidfile=$DIR/pids/$1
  [[ -f $pidfile ]] || return 0
  local pid
  pid=$(cat "$pidfile")
  kill -"$2" "$pid" 2>/dev/null
  for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null
  rm -f "$pidfile"
}
for i in 1 2 3; do stop "controller-$i" TERM; done
for i in 1 2 3; do stop "nats-$i" TERM; done
stop postgres INT
