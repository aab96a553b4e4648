#!/usr/bin/env bash
# A single-node Slurm cluster on localhost for the tests of `optima sweep
# --launcher slurm` (tests/test_slurm.py): munged, slurmctld and slurmd, as root.
# Does nothing when a Slurm cluster already answers. Installs Debian's slurm-wlm
# and munge when they are missing. Records what it started in $STATE/started,
# which .ci/slurm/stop.sh stops.
set -euo pipefail
STATE=${OPTIMA_SLURM_STATE:-/var/spool/optima-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by optima .ci/slurm/start.sh"

if command -v sinfo >/dev/null && timeout 10 sinfo -h -o %t 2>/dev/null | grep -qE 'idle|mix|alloc'; then
    echo "slurm: a cluster already answers (sinfo); nothing started"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "slurm: no cluster answers and starting one needs root; the Slurm tests will skip" >&2
    exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    echo "slurm: installing slurm-wlm and munge (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
fi
if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    echo "slurm: $CONF exists and is not ours, and no cluster answers; start that cluster instead" >&2
    exit 1
fi

mkdir -p "$STATE/ctld" "$STATE/d" /run/munge /var/log/munge /var/lib/munge /etc/munge
: > "$STATE/started"
# munge: a key, then the daemon (as the munge user when there is one)
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
if id munge >/dev/null 2>&1; then
    chown munge:munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
    chmod 400 /etc/munge/munge.key
    RUN_MUNGE=(runuser -u munge --)
else
    RUN_MUNGE=()
fi
if ! pgrep -x munged >/dev/null; then
    "${RUN_MUNGE[@]}" /usr/sbin/munged --pid-file=/run/munge/munged.pid
    echo munged >> "$STATE/started"
fi

# slurm.conf: this node with its real CPU count and memory (slurmd -C), one partition
node=$(slurmd -C | head -n 1)
cat > "$CONF" <<CONF
$MARK
ClusterName=optima-ci
SlurmctldHost=$(hostname -s)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# finished jobs leave squeue after 10 s; a cancelled job's processes get 10 s after SIGTERM
MinJobAge=10
KillWait=10
SchedulerParameters=sched_interval=2
# a job runs at the nice value of the process that submitted it
PropagatePrioProcess=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
$node
PartitionName=debug Nodes=$(hostname -s) Default=YES MaxTime=INFINITE State=UP
CONF
echo conf >> "$STATE/started"

if ! pgrep -x slurmctld >/dev/null; then
    slurmctld
    echo slurmctld >> "$STATE/started"
fi
if ! pgrep -x slurmd >/dev/null; then
    slurmd
    echo slurmd >> "$STATE/started"
fi
for _ in $(seq 60); do
    if timeout 5 sinfo -h -o %t 2>/dev/null | grep -q idle; then
        echo "slurm: $(hostname -s) idle ($(sinfo -h -o '%c CPUs, %m MB, partition %P'))"
        exit 0
    fi
    sleep 0.5
done
echo "slurm: the node did not become idle; see $STATE/slurmctld.log and $STATE/slurmd.log" >&2
sinfo >&2 || true
exit 1
