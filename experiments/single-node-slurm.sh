#!/usr/bin/env bash
# A one-machine Slurm (controller and compute node both here) to try the run lists' job arrays on, and for
# test_cluster.py. Debian, as root, no systemd needed:
#   experiments/single-node-slurm.sh          install if missing, start, wait for the node, say how to use it
#   experiments/single-node-slurm.sh stop     stop the daemons this script started
# Everything it writes (config, key, state, logs) lives in $SLURM_DIR (default /tmp/single-node-slurm).
set -euo pipefail
dir=${SLURM_DIR:-/tmp/single-node-slurm}
conf=$dir/slurm.conf
daemons="slurmd slurmctld munged"  # stopped in this order: the node first, the key server last

running() { [ -f "$dir/$1.pid" ] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null; }

if [ "${1:-start}" = stop ]; then
    for d in $daemons; do
        running "$d" || continue
        pid=$(cat "$dir/$d.pid")
        kill "$pid"
        # gone before the next one stops or a start follows (a port or socket still held would clash)
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        rm -f "$dir/$d.pid"
        echo "stopped $d"
    done
    exit 0
elif [ "${1:-start}" != start ]; then
    echo "error: usage: $0 [start|stop]" >&2
    exit 2
fi
[ "$(id -u)" = 0 ] || { echo "error: run as root (the daemons run as root here, SlurmUser=root)" >&2; exit 1; }
if running slurmctld && running slurmd; then
    echo "already running; use it with: export SLURM_CONF=$conf"
    exit 0
fi

if ! hash slurmctld slurmd sbatch munged 2>/dev/null; then  # (command -v succeeds when any one is found)
    # an image's package lists may be empty or stale: update them only when the install needs it
    pkgs="slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends $pkgs >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $pkgs >/dev/null; }
fi

# munged refuses a socket folder others cannot traverse and a key others can read
mkdir -p "$dir"/{munge,state,spool}
chmod 755 "$dir" "$dir/munge"
mkdir -p -m 700 "$dir/key"
[ -f "$dir/key/munge.key" ] || mungekey --create --keyfile="$dir/key/munge.key"
running munged || munged --socket="$dir/munge/munge.socket.2" --key-file="$dir/key/munge.key" \
    --log-file="$dir/munged.log" --pid-file="$dir/munged.pid" --seed-file="$dir/munge/munged.seed"

# ports off Slurm's defaults (6817/6818), so that a real cluster's daemons on this machine are left alone
cat > "$conf" <<EOF
ClusterName=single-node
SlurmctldHost=$(hostname -s)
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
# a requeued job may start again cred_expire seconds later (default 120), at the next scheduling pass (every 60 s):
# on one machine a few seconds suffice
AuthInfo=socket=$dir/munge/munge.socket.2,cred_expire=5
SchedulerParameters=sched_interval=2
SlurmUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
# no cgroups to write to in a container: track a job's processes by their parents, bind no cores
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
# a node that was down (the daemons stopped) comes back by itself when slurmd starts again
ReturnToService=2
MailProg=/bin/true
$(slurmd -C | head -1) State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$conf
running slurmctld || slurmctld -f "$conf"
running slurmd || slurmd -f "$conf"

for _ in $(seq 60); do  # under a second here; give up after 30
    state=$(sinfo -h -N -o %t 2>/dev/null || true)
    [ "$state" = idle ] && break
    sleep 0.5
done
if [ "$state" != idle ]; then
    echo "error: the node is '${state:-not answering}' after 30 s; see $dir/slurmctld.log and $dir/slurmd.log" >&2
    exit 1
fi
echo "Slurm is up: one node, $(sinfo -h -o %c) CPUs. To use it:"
echo "  export SLURM_CONF=$conf"
echo "  sinfo; sbatch ...; squeue      (stop it with: $0 stop)"
