#!/usr/bin/env bash
# A one-host SLURM cluster (munged, slurmctld, slurmd of Debian's slurm-wlm) in a folder of its own, for trying
# hydra/launcher=submitit_slurm here: bash scripts/slurm-local.sh start|stop|status.
#
# start installs the packages with apt-get where they are missing (root needed), writes slurm.conf for this
# host's name, CPUs and memory (`slurmd -C`) into $SLURM_LOCAL_DIR, starts the three daemons as root and waits
# until `sinfo` shows the node idle. Nothing is written under /etc: clients find the cluster through
# SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf, which `start` and `status` print. stop ends the daemons by their pid
# files. Jobs run as root on this host, in the submitter's environment (sbatch's default --export=ALL).
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/runner-slurm}
CONF=$DIR/slurm.conf
PORT=${SLURM_LOCAL_PORT:-6817}  # slurmctld; slurmd takes the next one
DAEMONS=(slurmd slurmctld munged)  # stopped in this order
WAIT_S=60

say() { echo "slurm-local: $*"; }
die() { echo "slurm-local: error: $*" >&2; exit 2; }

running() { [[ -s $DIR/$1.pid ]] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sinfo >/dev/null && return
    [[ $(id -u) == 0 ]] || die "slurmctld, slurmd or munged missing and not root: run as root, or apt-get install slurmctld slurmd slurm-client munge"
    command -v apt-get >/dev/null || die "slurmctld, slurmd or munged missing and no apt-get: install Debian's slurm-wlm"
    say "installing slurmctld slurmd slurm-client munge (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurm-client munge >"$DIR/apt.log" 2>&1 || die "apt-get failed: see $DIR/apt.log"
}

write_conf() {
    local node
    node=$(slurmd -C | head -1)  # NodeName=<host> CPUs=... RealMemory=...
    cat >"$CONF" <<EOF
ClusterName=runner
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge.socket
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    running munged && return
    [[ -s $DIR/munge.key ]] || { dd if=/dev/urandom of="$DIR/munge.key" bs=1024 count=1 status=none; }
    chmod 0400 "$DIR/munge.key"
    munged --force --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" --pid-file="$DIR/munged.pid" \
        --log-file="$DIR/munged.log" --seed-file="$DIR/munged.seed" || die "munged did not start: see $DIR/munged.log"
}

idle() { [[ $(SLURM_CONF=$CONF sinfo -h -N -o %T 2>/dev/null) == idle ]]; }

start() {
    mkdir -p "$DIR/state" "$DIR/spool"
    chmod 0700 "$DIR"
    install
    running slurmctld || write_conf
    start_munge
    running slurmctld || slurmctld -f "$CONF" || die "slurmctld did not start: see $DIR/slurmctld.log"
    running slurmd || slurmd -f "$CONF" || die "slurmd did not start: see $DIR/slurmd.log"
    local waited=0
    until idle; do
        (( waited++ < WAIT_S )) || die "the node is not idle after ${WAIT_S} s: see $DIR/slurmctld.log, $DIR/slurmd.log"
        sleep 1
    done
    status
}

stop() {
    local daemon pid
    for daemon in "${DAEMONS[@]}"; do
        running "$daemon" || continue
        pid=$(cat "$DIR/$daemon.pid")
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        rm -f "$DIR/$daemon.pid"
        say "stopped $daemon ($pid)"
    done
}

status() {
    running slurmctld && running slurmd || { say "not running (SLURM_CONF=$CONF)"; return 3; }
    say "running: SLURM_CONF=$CONF"
    SLURM_CONF=$CONF sinfo -N
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start|stop|status (folder: SLURM_LOCAL_DIR, default /tmp/runner-slurm)" ;;
esac
