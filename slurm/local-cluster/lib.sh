# Shared by start/stop/status (sourced, not run). Resolves where the cluster lives.
#
# SPIKESCALE_SLURM_DIR  config, state, logs, munge key/socket and recorded pids
#                       (default /tmp/spikescale-slurm). Keep it short: munge and slurmd put
#                       unix sockets in it, and socket paths are limited to 107 bytes.
# SPIKESCALE_SLURM_PORT slurmctld's port; slurmd listens on the next one (default 16817, away
#                       from a system Slurm's 6817/6818 so the two never meet).

CLUSTER_DIR="${SPIKESCALE_SLURM_DIR:-/tmp/spikescale-slurm}"
CTLD_PORT="${SPIKESCALE_SLURM_PORT:-16817}"
SLURMD_PORT=$((CTLD_PORT + 1))
CONF="$CLUSTER_DIR/etc/slurm.conf"
MUNGE_SOCKET="$CLUSTER_DIR/munge/munge.socket"
PID_DIR="$CLUSTER_DIR/pids"
# What start created in the network (bridge, namespaces), one "kind name" per line, for stop.
NET_RECORD="$CLUSTER_DIR/net-created"

# Prints the pid recorded for daemon $1 (munged, slurmctld, slurmd or slurmd-<node>) if that
# process is still the daemon we started (a recycled pid running something else does not count).
live_pid() {
  local file="$PID_DIR/$1.pid" pid
  [[ -f "$file" ]] || return 1
  pid=$(<"$file")
  [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "${1%%-*}" || return 1
  echo "$pid"
}

# The daemons start recorded (pid files), whatever node count it was started with.
recorded_daemons() {
  local f
  for f in "$PID_DIR"/*.pid; do
    if [[ -e "$f" ]]; then basename "$f" .pid; fi
  done
}
