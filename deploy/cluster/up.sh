#!/usr/bin/env bash
# Brings up Baton's highly available control plane on this machine's
# loopback: PostgreSQL, a three-node NATS cluster (MQTT + JetStream) and
# three `baton server`s on them (one leads, two stand by). A rehearsal of
# the production layout in README.md beside this file, and what
# tests/tests/cluster.rs runs. Run as root or as a user; stop with down.sh.
#
#   deploy/cluster/up.sh                     # state in ./baton-cluster, ports from 17000
#   DIR=/tmp/c BASE_PORT=27000 deploy/cluster/up.sh
#
# Environment: DIR (state, logs, pids), BASE_PORT, or each port on its own
# (PG_PORT; NATS_PORTS, MQTT_PORTS, ROUTE_PORTS, API_PORTS: three each,
# space-separated), BATON (the `baton` binary; default: on PATH, else
# target/release or target/debug of this checkout), BATON_SERVER_ARGS
# (more flags for every controller). Prints the brokers and API URLs, and
# writes them to $DIR/cluster.env.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
DIR=${DIR:-$PWD/baton-cluster}
BASE_PORT=${BASE_PORT:-17000}
PG_PORT=${PG_PORT:-$BASE_PORT}
read -r -a nats <<<"${NATS_PORTS:-$((BASE_PORT + 11)) $((BASE_PORT + 12)) $((BASE_PORT + 13))}"
read -r -a mqtt <<<"${MQTT_PORTS:-$((BASE_PORT + 21)) $((BASE_PORT + 22)) $((BASE_PORT + 23))}"
read -r -a route <<<"${ROUTE_PORTS:-$((BASE_PORT + 31)) $((BASE_PORT + 32)) $((BASE_PORT + 33))}"
read -r -a api <<<"${API_PORTS:-$((BASE_PORT + 41)) $((BASE_PORT + 42)) $((BASE_PORT + 43))}"

if [[ -z ${BATON:-} ]]; then
  for candidate in "$(command -v baton || true)" "$here/../../target/release/baton" "$here/../../target/debug/baton"; do
    if [[ -n $candidate && -x $candidate ]]; then BATON=$candidate; break; fi
  done
fi
[[ -n ${BATON:-} && -x $BATON ]] || { echo "up.sh: no baton binary (set BATON=PATH, or build: cargo build --release --bins)" >&2; exit 1; }
command -v nats-server >/dev/null || { echo "up.sh: nats-server is not installed (apt-get install nats-server)" >&2; exit 1; }
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[[ -n $pg_bin && -x $pg_bin/initdb ]] || { echo "up.sh: PostgreSQL is not installed (apt-get install postgresql)" >&2; exit 1; }

mkdir -p "$DIR/pids" "$DIR/logs" "$DIR/keys"
for pidfile in "$DIR"/pids/*; do
  [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null &&
    { echo "up.sh: $(basename "$pidfile") of $DIR is running already: stop it with down.sh first" >&2; exit 1; }
done
start() { # name, command...: runs it in the background, its output in logs/NAME.log
  local name=$1; shift
  "$@" >>"$DIR/logs/$name.log" 2>&1 &
  echo $! >"$DIR/pids/$name"
}
wait_for() { # what, seconds, command...
  local what=$1 secs=$2; shift 2
  for ((i = 0; i < secs * 10; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "up.sh: $what did not come up in ${secs}s; see $DIR/logs" >&2
  exit 1
}

# PostgreSQL: a cluster of its own in $DIR/postgres (PostgreSQL refuses to run as root).
as_pg=()
if [[ $(id -u) == 0 ]]; then
  as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups)
  mkdir -p "$DIR/postgres" && chown postgres: "$DIR/postgres"
  "${as_pg[@]}" test -w "$DIR/postgres" ||
    { echo "up.sh: the postgres user cannot reach $DIR/postgres (a parent directory is private): choose another DIR" >&2; exit 1; }
fi
if [[ ! -f $DIR/postgres/data/PG_VERSION ]]; then
  "${as_pg[@]}" "$pg_bin/initdb" -D "$DIR/postgres/data" -U baton -A trust -E UTF8 >"$DIR/logs/initdb.log" 2>&1
fi
start postgres "${as_pg[@]}" "$pg_bin/postgres" -D "$DIR/postgres/data" -c listen_addresses=127.0.0.1 \
  -c port="$PG_PORT" -c unix_socket_directories="$DIR/postgres"
wait_for PostgreSQL 30 "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -U baton
"$pg_bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U baton -d postgres -Atc "SELECT 1 FROM pg_database WHERE datname = 'baton'" | grep -q 1 ||
  "$pg_bin/createdb" -h 127.0.0.1 -p "$PG_PORT" -U baton baton
store="postgres://baton@127.0.0.1:$PG_PORT/baton"

# NATS: three nodes, each routed to all three.
for i in 0 1 2; do
  mkdir -p "$DIR/nats-$((i + 1))"
  NODE_NAME=n$((i + 1)) NODE_HOST=127.0.0.1 NODE_DIR="$DIR/nats-$((i + 1))" \
    NODE_CLIENT_PORT=${nats[$i]} NODE_MQTT_PORT=${mqtt[$i]} NODE_CLUSTER_PORT=${route[$i]} \
    ROUTE_1=nats-route://127.0.0.1:${route[0]} ROUTE_2=nats-route://127.0.0.1:${route[1]} ROUTE_3=nats-route://127.0.0.1:${route[2]} \
    start "nats-$((i + 1))" nats-server -c "$here/nats.conf"
done
for i in 0 1 2; do
  wait_for "NATS node $((i + 1))" 30 bash -c "exec 3<>/dev/tcp/127.0.0.1/${mqtt[$i]}"
done
brokers="mqtt://127.0.0.1:${mqtt[0]},mqtt://127.0.0.1:${mqtt[1]},mqtt://127.0.0.1:${mqtt[2]}"

# One signing key and one secrets key for every controller (devices trust the key, not the machine).
for key in signing secrets; do
  [[ -f $DIR/keys/$key.key ]] || (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$DIR/keys/$key.key")
done

# Three controllers, each listing the nodes in its own order.
for i in 0 1 2; do
  order="mqtt://127.0.0.1:${mqtt[$i]},mqtt://127.0.0.1:${mqtt[$(((i + 1) % 3))]},mqtt://127.0.0.1:${mqtt[$(((i + 2) % 3))]}"
  # shellcheck disable=SC2086 # BATON_SERVER_ARGS is a list of flags
  start "controller-$((i + 1))" "$BATON" server --listen "127.0.0.1:${api[$i]}" --data-dir "$DIR/controller-$((i + 1))" \
    --store "$store" --broker "$order" --ingest-qos 0 --signing-key "$DIR/keys/signing.key" --secrets-key "$DIR/keys/secrets.key" \
    ${BATON_SERVER_ARGS:-}
done
serving() {
  for p in "${api[@]}"; do
    curl -sf "http://127.0.0.1:$p/healthz" | grep -q '"broker_connected":true' && { echo "$p"; return 0; }
  done
  return 1
}
wait_for "a leading controller" 60 serving
leader=$(serving)
# The others stand by (their port answers 503 "standby"); one that died says why in its log.
for i in 0 1 2; do
  [[ ${api[$i]} == "$leader" ]] && continue
  wait_for "controller-$((i + 1)) standing by" 30 bash -c "curl -s http://127.0.0.1:${api[$i]}/healthz | grep -q standby"
done

cat >"$DIR/cluster.env" <<ENV
BATON_BROKERS=$brokers
BATON_STORE=$store
BATON_APIS="http://127.0.0.1:${api[0]} http://127.0.0.1:${api[1]} http://127.0.0.1:${api[2]}"
BATON_LEADER=http://127.0.0.1:$leader
ENV
echo "PostgreSQL:  $store"
echo "NATS (MQTT): $brokers"
echo "controllers: http://127.0.0.1:${api[0]} http://127.0.0.1:${api[1]} http://127.0.0.1:${api[2]} (leading: http://127.0.0.1:$leader)"
echo "agents:      broker = \"$brokers\" (give each device the nodes in its own order)"
echo "stop:        DIR=$DIR $here/down.sh"
