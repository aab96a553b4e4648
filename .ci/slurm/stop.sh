#!/usr/bin/env bash
# Stops what .ci/slurm/start.sh started (as listed in $STATE/started), nothing else.
set -uo pipefail
STATE=${OPTIMA_SLURM_STATE:-/var/spool/optima-slurm}
[ -f "$STATE/started" ] || exit 0
stop() {  # a daemon by its pid file: SIGTERM, then wait for it to go
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 0
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    echo "slurm: $2 ($pid) did not stop" >&2
}
grep -qx slurmd "$STATE/started" && stop "$STATE/slurmd.pid" slurmd
grep -qx slurmctld "$STATE/started" && stop "$STATE/slurmctld.pid" slurmctld
grep -qx munged "$STATE/started" && stop /run/munge/munged.pid munged
grep -qx conf "$STATE/started" && rm -f /etc/slurm/slurm.conf
rm -f "$STATE/started"
echo "slurm: stopped what .ci/slurm/start.sh started"
