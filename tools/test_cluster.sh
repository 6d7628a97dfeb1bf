#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for nst_exp's cluster tests (tests/test_slurm.py).
# Documented in docs/clusters-testing.md. Debian 12 (or Ubuntu 22.04+), as root, in a container
# or VM without systemd as PID 1: every daemon is started by hand and stopped by the PID recorded here.
#
#   sudo bash tools/test_cluster.sh start     # install slurm-wlm + munge, configure, start, check with srun
#   sudo bash tools/test_cluster.sh status    # sinfo and the daemons this script started
#   sudo bash tools/test_cluster.sh stop      # stop those daemons (only those), newest first
#
# Settings (environment):
#   NST_CLUSTER_ACCOUNTING=1   MariaDB + slurmdbd so that `sacct` answers (submitit asks it for job
#                              states); 0: none (submitit then relies on its result files only)
#   NST_CLUSTER_STATE=/tmp/nst_exp-test-cluster   where the PIDs and logs of this script go
#   NST_CLUSTER_CPUS=2, NST_CLUSTER_MEM_MB          the node's size (memory default: 80% of this machine's);
#                              tests/test_slurm.py pre-empts with a 2-CPU job, so keep 2 CPUs for it
#
# The cluster: partitions `debug` (default, low priority, jobs requeued when pre-empted, 60 s grace)
# and `urgent` (high priority): a job in `urgent` that needs the CPUs pre-empts `debug` jobs, and
# the job's --signal (submitit sends USR2) arrives at pre-emption, as on a real shared cluster.
# No GPUs (submit with hydra.launcher.gpus_per_node=0).
set -euo pipefail

STATE=${NST_CLUSTER_STATE:-/tmp/nst_exp-test-cluster}
ACCOUNTING=${NST_CLUSTER_ACCOUNTING:-1}
CPUS=${NST_CLUSTER_CPUS:-2}  # the tests pre-empt a 1-CPU job with a 2-CPU urgent one: 2 makes them meet
MEM_MB=${NST_CLUSTER_MEM_MB:-$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))}
NODE=$(hostname -s)
CONF=/etc/slurm
LOGS=$STATE/logs
DAEMONS=(munged mariadb slurmdbd slurmctld slurmd)  # start order; stop goes the other way

say() { echo "test_cluster: $*"; }
die() { echo "test_cluster: error: $*" >&2; exit 1; }

record() {  # record NAME PIDFILE: keep the PID a daemon wrote, so that stop ends that process only
  local name=$1 pidfile=$2
  for _ in $(seq 20); do [ -s "$pidfile" ] && break; sleep 0.5; done
  [ -s "$pidfile" ] || die "$name did not start (see $LOGS)"
  cp "$pidfile" "$STATE/$name.pid"
}

running() { [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

install_packages() {
  local packages=(slurm-wlm munge)
  [ "$ACCOUNTING" = 1 ] && packages+=(slurmdbd mariadb-server)
  if ! command -v slurmctld >/dev/null || { [ "$ACCOUNTING" = 1 ] && ! command -v slurmdbd >/dev/null; }; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}"
  fi
}

start_munge() {
  [ -s /etc/munge/munge.key ] || head -c 1024 /dev/urandom > /etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  if ! munge -n >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    record munged /run/munge/munged.pid
  fi
  munge -n | unmunge | grep -q 'STATUS: *Success' || die "munge does not authenticate"
}

start_accounting() {
  install -d -o mysql -g mysql /run/mysqld
  if ! mysql -u root -e 'select 1' >/dev/null 2>&1; then
    setsid /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid --socket=/run/mysqld/mysqld.sock \
      >"$LOGS/mariadb.log" 2>&1 </dev/null &
    for _ in $(seq 30); do mysql -u root -e 'select 1' >/dev/null 2>&1 && break; sleep 1; done
    record mariadb /run/mysqld/mysqld.pid
  fi
  local password
  password=$(cat "$STATE/dbpass" 2>/dev/null || head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' | tee "$STATE/dbpass")
  mysql -u root <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$password';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$password';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
  cat > "$CONF/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=$LOGS/slurmdbd.log
PidFile=$STATE/slurmdbd.daemon.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$password
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$CONF/slurmdbd.conf"
  if ! running slurmdbd; then
    slurmdbd
    record slurmdbd "$STATE/slurmdbd.daemon.pid"
    sleep 2
  fi
}

write_slurm_conf() {
  local accounting="AccountingStorageType=accounting_storage/none"
  [ "$ACCOUNTING" = 1 ] && accounting="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost"
  mkdir -p "$STATE/ctld" "$STATE/slurmd"
  cat > "$CONF/slurm.conf" <<EOF
# written by nst_exp tools/test_cluster.sh: a one-node test cluster
ClusterName=nst-exp-test
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.daemon.pid
SlurmdPidFile=$STATE/slurmd.daemon.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
$accounting
KillWait=30
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=$NODE CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=60
PartitionName=urgent Nodes=ALL Default=NO MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
}

foreign_daemons() {  # SLURM daemons running that this script did not start (another cluster on this machine)
  local name pid
  for name in slurmctld slurmd slurmdbd; do
    for pid in $(pgrep -x "$name" || true); do
      [ -f "$STATE/$name.pid" ] && [ "$(cat "$STATE/$name.pid")" = "$pid" ] && continue
      echo "$name (pid $pid)"
    done
  done
}

start() {
  [ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts daemons)"
  local foreign
  foreign=$(foreign_daemons | paste -sd, -)
  if [ -n "$foreign" ]; then  # its slurm.conf must not be overwritten under it
    die "a SLURM cluster not started by this script is running here: ${foreign}; use it (sinfo shows its partitions) or stop it first"
  fi
  mkdir -p "$STATE" "$LOGS" "$CONF"
  install_packages
  start_munge
  [ "$ACCOUNTING" = 1 ] && start_accounting
  write_slurm_conf
  if ! running slurmctld; then slurmctld; record slurmctld "$STATE/slurmctld.daemon.pid"; fi
  if ! running slurmd; then slurmd; record slurmd "$STATE/slurmd.daemon.pid"; fi
  for _ in $(seq 30); do sinfo -h -o %t | grep -qE 'idle|mix' && break; sleep 1; done
  sinfo
  timeout 120 srun -p debug hostname >/dev/null || die "srun did not run a job (see $LOGS)"
  say "up: partitions debug and urgent on $NODE ($CPUS CPUs, $MEM_MB MB); stop with: bash $0 stop"
}

stop() {
  local i name pid
  for (( i=${#DAEMONS[@]}-1; i>=0; i-- )); do
    name=${DAEMONS[i]}
    [ -f "$STATE/$name.pid" ] || continue
    pid=$(cat "$STATE/$name.pid")
    if kill -0 "$pid" 2>/dev/null; then
      say "stopping $name (pid $pid)"
      kill "$pid"
      for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    fi
    rm -f "$STATE/$name.pid"
  done
}

status() {
  local name
  for name in "${DAEMONS[@]}"; do
    if running "$name"; then say "$name running (pid $(cat "$STATE/$name.pid"))"; fi
  done
  sinfo 2>/dev/null || say "no cluster answers (start it with: bash $0 start)"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: bash $0 start|status|stop" >&2; exit 2 ;;
esac
