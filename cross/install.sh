#!/bin/sh
# Installs (or upgrades, or removes) the Baton agent on a device: the binary,
# /etc/baton/agent.toml, a systemd unit and the data directory. Idempotent:
# run it again to upgrade; the config and data are kept.
#
# The binary goes into the A/B layout the agent upgrades itself in (see
# README, "Agent self-update"): /var/lib/baton/agent/bin/releases/baton-agent-<version>-<sha256 12>,
# bin/current links to it (bin/previous to the one it replaces), and
# /usr/local/bin/baton-agent links to bin/current. A device installed
# before the layout existed moves into it at its first upgrade.
#
#   install.sh --binary ./baton-agent --broker mqtt://controller.lan:1883 --controller-key ed25519:HEX [--device-id ID] [--label k=v]…
#   install.sh --uninstall [--purge]
#
#   --binary PATH     the agent to install (default: ./baton-agent, or the one for this CPU in ./<target>/)
#   --broker URL      written to a new agent.toml (an existing one is kept unless --force-config)
#   --controller-key K  the controller's signing key (`baton trust`); without it the agent
#                     trusts the first signer it hears from (trust on first use)
#   --device-id ID    default: derived from /etc/machine-id by the agent
#   --label k=v       repeatable
#   --force-config    rewrite agent.toml even if it exists
#   --root DIR        install under DIR instead of / (image building, tests); no systemctl
#   --uninstall       stop and remove the service and binary; keeps config, data and running containers
#   --purge           with --uninstall: also stop every container and delete config and data
set -eu

root=""
binary=""
broker=""
device_id=""
controller_key=""
labels=""
force_config=false
uninstall=false
purge=false
while [ $# -gt 0 ]; do
  case $1 in
    --binary) binary=$2; shift 2 ;;
    --broker) broker=$2; shift 2 ;;
    --device-id) device_id=$2; shift 2 ;;
    --controller-key) controller_key=$2; shift 2 ;;
    --label) labels="$labels$2
"; shift 2 ;;
    --force-config) force_config=true; shift ;;
    --root) root=$2; shift 2 ;;
    --uninstall) uninstall=true; shift ;;
    --purge) purge=true; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

bin_path=$root/usr/local/bin/baton-agent
conf_dir=$root/etc/baton
unit_path=$root/etc/systemd/system/baton-agent.service
data_dir=/var/lib/baton/agent
bin_dir=$root$data_dir/bin
systemd=false
if [ -z "$root" ] && [ -d /run/systemd/system ]; then systemd=true; fi

if $uninstall; then
  if $systemd; then
    systemctl disable --now baton-agent.service 2>/dev/null || true
  fi
  if $purge && [ -z "$root" ]; then
    # Each shim stops its container (SIGTERM, then SIGKILL after its grace) and exits.
    # Shims run from whichever build started them (/usr/local/bin/… or bin/releases/…).
    shims='/baton-agent[^ /]* shim '
    pkill -TERM -f "$shims" 2>/dev/null || true
    i=0
    while pgrep -f "$shims" >/dev/null 2>&1 && [ $i -lt 30 ]; do sleep 1; i=$((i + 1)); done
  fi
  if $purge; then
    rm -rf "$conf_dir" "$root$data_dir" "$root/run/baton"
  fi
  rm -f "$unit_path" "$bin_path"
  if $systemd; then systemctl daemon-reload; fi
  echo "baton-agent removed$($purge && echo ', with its config, data and containers' || echo '; config, data and containers kept')"
  exit 0
fi

if [ -z "$binary" ]; then
  case $(uname -m) in
    aarch64) guess=aarch64-unknown-linux-musl ;;
    armv7l|armv8l) guess=armv7-unknown-linux-gnueabihf ;;
    *) guess=none ;;
  esac
  for b in ./baton-agent "./$guess/baton-agent"; do
    if [ -f "$b" ]; then binary=$b; break; fi
  done
fi
[ -n "$binary" ] && [ -f "$binary" ] || { echo "install.sh: no agent binary (use --binary PATH)" >&2; exit 1; }

mkdir -p "$(dirname "$bin_path")" "$conf_dir" "$(dirname "$unit_path")" "$root$data_dir" "$bin_dir/releases"
chmod 700 "$root$data_dir"
# The build's name: its stamped version (read from the file, so a build for
# another CPU installs into a staging root too) and its digest.
version=$(LC_ALL=C grep -a -o 'baton-agent-version=[A-Za-z0-9.+_-]*' "$binary" | head -n 1 | cut -d= -f2)
[ -n "$version" ] || { echo "install.sh: $binary carries no Baton agent version stamp: not an agent build" >&2; exit 1; }
sha=$(sha256sum "$binary" | cut -c1-12)
release=baton-agent-$version-$sha
# Copied under a temporary name, then renamed: a running agent keeps its inode.
if [ ! -f "$bin_dir/releases/$release" ]; then
  cp "$binary" "$bin_dir/releases/.$release.tmp"
  chmod 755 "$bin_dir/releases/.$release.tmp"
  mv -f "$bin_dir/releases/.$release.tmp" "$bin_dir/releases/$release"
fi
# bin/current -> this build (the one it replaces becomes bin/previous); each
# link made under a temporary name and renamed over the old one.
relink() { rm -f "$1.tmp" && ln -s "$2" "$1.tmp" && mv -f "$1.tmp" "$1"; }
old=$(readlink "$bin_dir/current" 2>/dev/null || true)
if [ -n "$old" ] && [ "$old" != "releases/$release" ]; then relink "$bin_dir/previous" "$old"; fi
relink "$bin_dir/current" "releases/$release"
# The entry point the unit starts links to bin/current (relative: right in a staging root too).
relink "$bin_path" "../../..$data_dir/bin/current"

if [ ! -f "$conf_dir/agent.toml" ] || $force_config; then
  [ -n "$broker" ] || { echo "install.sh: --broker mqtt://HOST:PORT is needed for a new agent.toml" >&2; exit 1; }
  {
    echo "# Baton agent. Every key is documented in Baton's README."
    echo "broker = \"$broker\""
    [ -n "$device_id" ] && echo "device_id = \"$device_id\""
    [ -n "$controller_key" ] && echo "controller_keys = [\"$controller_key\"]"
    echo "data_dir = \"$data_dir\""
    if [ -n "$labels" ]; then
      echo "[labels]"
      printf '%s' "$labels" | while IFS='=' read -r k v; do
        [ -n "$k" ] && echo "$k = \"$v\""
      done
    fi
  } >"$conf_dir/agent.toml.new"
  mv -f "$conf_dir/agent.toml.new" "$conf_dir/agent.toml"
fi

cat >"$unit_path.new" <<'UNIT'
[Unit]
Description=Baton device agent
Wants=network-online.target
After=network-online.target
# Never give up restarting: a new agent that fails its trial exits, and the
# restart is what brings the previous one back (see README, "Agent self-update").
StartLimitIntervalSec=0

[Service]
ExecStart=/usr/local/bin/baton-agent --config /etc/baton/agent.toml
Restart=always
RestartSec=2
# Stopping or upgrading the agent must never stop containers: only the agent
# process is signalled; each container's shim (and the container) carries on
# and the next agent re-adopts them.
KillMode=process
# The agent and its shims; containers live in their own cgroups (/baton/…).
MemoryMax=128M
TasksMax=4096
LimitNOFILE=65536
# Under memory pressure the kernel should pick a container, not the agent.
OOMScoreAdjust=-900
Environment=BATON_LOG=info

[Install]
WantedBy=multi-user.target
UNIT
mv -f "$unit_path.new" "$unit_path"

if $systemd; then
  systemctl daemon-reload
  systemctl enable baton-agent.service >/dev/null 2>&1
  # A restart re-adopts running containers; nothing they run is interrupted.
  systemctl restart baton-agent.service
  echo "baton-agent installed and running ($("$bin_path" --version))"
else
  echo "baton-agent installed under ${root:-/} ($("$bin_path" --version 2>/dev/null || echo "$(basename "$binary")"))"
fi
