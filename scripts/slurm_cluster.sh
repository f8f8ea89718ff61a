#!/usr/bin/env bash
# A real one-node SLURM cluster on localhost, from Debian's packages:
# munged, MariaDB + slurmdbd (accounting, which submitit needs to read job states), slurmctld and slurmd.
#
# usage: scripts/slurm_cluster.sh up [--no-install]   start everything (idempotent); prints the line to eval
#        scripts/slurm_cluster.sh down [--purge]       cancel jobs, stop the daemons (--purge: delete the state)
#        scripts/slurm_cluster.sh status               what runs, and sinfo
#        scripts/slurm_cluster.sh env                  print `export SLURM_CONF=...` (exit 1 when not up)
#
#   eval "$(bash scripts/slurm_cluster.sh up)"     # then sbatch, squeue, python -m bench sweep launcher=slurm ...
#
# Settings (environment): BENCH_SLURM_DIR (state, default /tmp/bench-slurm), BENCH_SLURM_CLUSTER (bench),
# BENCH_SLURM_CTLD_PORT (6817), BENCH_SLURM_SLURMD_PORT (6818), BENCH_SLURM_DBD_PORT (6819),
# BENCH_SLURM_DB_PORT (MariaDB, 3307).
# Needs root. The daemons run detached (setsid, own session) and are never started under `timeout`.
set -euo pipefail

STATE=${BENCH_SLURM_DIR:-/tmp/bench-slurm}
CLUSTER=${BENCH_SLURM_CLUSTER:-bench}
CTLD_PORT=${BENCH_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${BENCH_SLURM_SLURMD_PORT:-6818}
DBD_PORT=${BENCH_SLURM_DBD_PORT:-6819}
DB_PORT=${BENCH_SLURM_DB_PORT:-3307}
DB_PASS=bench-slurm-db
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)

ETC=$STATE/etc
RUN=$STATE/run
LOG=$STATE/log
DB_DIR=$STATE/mysql
DB_SOCK=$RUN/mysqld.sock
CONF=$ETC/slurm.conf
MUNGE_SOCK=/run/munge/munge.socket.2
export SLURM_CONF=$CONF

say() { echo "slurm_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

# ----------------------------------------------------------------------------- helpers

alive() {  # alive <name>: the daemon recorded in $RUN/<name>.pid is running
    local f=$RUN/$1.pid pid
    [[ -s $f ]] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

start_daemon() {  # start_daemon <name> <command...>: detached, in its own session, output to $LOG/<name>.out
    local name=$1
    shift
    setsid "$@" </dev/null >>"$LOG/$name.out" 2>&1 9>&- &
    echo $! >"$RUN/$name.pid"
}

stop_daemon() {  # stop_daemon <name>: TERM, wait up to 15 s, then KILL
    local name=$1 f=$RUN/$1.pid pid i
    [[ -s $f ]] || return 0
    pid=$(<"$f")
    if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "$name (pid $pid) ignored SIGTERM for 15 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        say "stopped $name (pid $pid)"
    fi
    rm -f "$f"
}

wait_for() {  # wait_for <seconds> <command...>: true once the command succeeds
    local secs=$1 i
    shift
    for ((i = 0; i < secs * 10; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    return 1
}

port_busy() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

need_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (munged, slurmd and the package install need it); try: sudo $0 $*"
}

missing_packages() {
    local p out=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || out+=("$p")
    done
    echo "${out[*]}"
}

install_packages() {
    local no_install=$1 missing
    missing=$(missing_packages)
    [[ -z $missing ]] && return 0
    if [[ $no_install == 1 ]]; then
        die "Debian packages missing: $missing (run 'bash scripts/slurm_cluster.sh up' once to install them)"
    fi
    command -v apt-get >/dev/null || die "packages missing ($missing) and there is no apt-get to install them"
    say "installing: $missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >"$LOG/apt.log" 2>&1 || die "apt-get update failed; see $LOG/apt.log"
    # shellcheck disable=SC2086
    apt-get install -y -qq $missing >>"$LOG/apt.log" 2>&1 || die "apt-get install $missing failed; see $LOG/apt.log"
}

show_log_tail() {  # show_log_tail <file>...
    local f
    for f in "$@"; do
        [[ -s $f ]] || continue
        say "--- last lines of $f:"
        tail -n 15 "$f" >&2
    done
}

# ----------------------------------------------------------------------------- configuration

write_configs() {
    local cpus sockets cores threads mem node
    node=$(slurmd -C 2>/dev/null | head -n 1)
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node")
    sockets=$(sed -n 's/.*SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$node")
    cores=$(sed -n 's/.*CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$node")
    threads=$(sed -n 's/.*ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$node")
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    cpus=${cpus:-$(nproc)}
    sockets=${sockets:-1}
    cores=${cores:-$cpus}
    threads=${threads:-1}
    mem=$(((${mem:-2048}) * 9 / 10))

    cat >"$CONF.tmp" <<EOF
# generated by scripts/slurm_cluster.sh; rewritten by every 'up'
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.own.pid
SlurmdPidFile=$RUN/slurmd.own.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
ReturnToService=2
KillWait=2
InactiveLimit=0
Waittime=0
MinJobAge=600
JobRequeue=1
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"

    (
        umask 077
        cat >"$ETC/slurmdbd.conf.tmp" <<EOF
# generated by scripts/slurm_cluster.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.own.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    )
    chmod 600 "$ETC/slurmdbd.conf.tmp"
    mv "$ETC/slurmdbd.conf.tmp" "$ETC/slurmdbd.conf"
}

# ----------------------------------------------------------------------------- the daemons

munge_ok() { munge -n -S "$MUNGE_SOCK" 2>/dev/null | unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then
        return 0
    fi
    [[ -s /etc/munge/munge.key ]] || {
        say "creating /etc/munge/munge.key"
        mungekey --create --keyfile=/etc/munge/munge.key >/dev/null 2>&1 || die "could not create the munge key"
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    }
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
    : >"$LOG/munged.out"
    chown munge:munge "$LOG/munged.out"
    start_daemon munged setpriv --reuid=munge --regid=munge --init-groups munged -F
    wait_for 10 munge_ok || { show_log_tail "$LOG/munged.out" /var/log/munge/munged.log; die "munged did not start"; }
    say "started munged (pid $(<"$RUN/munged.pid"))"
}

db() { mariadb --no-defaults --protocol=socket --socket="$DB_SOCK" -u root "$@"; }

start_mariadb() {
    if alive mariadb && db -e 'select 1' >/dev/null 2>&1; then
        return 0
    fi
    port_busy "$DB_PORT" && die "port $DB_PORT (MariaDB) is taken by another program; set BENCH_SLURM_DB_PORT"
    mkdir -p "$DB_DIR"
    if [[ ! -d $DB_DIR/mysql ]]; then
        say "initialising MariaDB in $DB_DIR"
        mariadb-install-db --no-defaults --datadir="$DB_DIR" --user=root --skip-test-db \
            --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 ||
            { show_log_tail "$LOG/mariadb-install.log"; die "mariadb-install-db failed"; }
    fi
    rm -f "$DB_SOCK"
    start_daemon mariadb mariadbd --no-defaults --datadir="$DB_DIR" --user=root --socket="$DB_SOCK" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$RUN/mariadb.own.pid" \
        --log-error="$LOG/mariadb.log" --innodb-buffer-pool-size=32M --max-connections=50
    wait_for 30 db -e 'select 1' || { show_log_tail "$LOG/mariadb.log"; die "MariaDB did not start"; }
    db -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
           CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
           CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
           GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
           GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
           FLUSH PRIVILEGES;" || die "could not create the accounting database user"
    say "started MariaDB (pid $(<"$RUN/mariadb.pid"), port $DB_PORT)"
}

start_slurmdbd() {
    if alive slurmdbd; then
        return 0
    fi
    port_busy "$DBD_PORT" && die "port $DBD_PORT (slurmdbd) is taken by another program; set BENCH_SLURM_DBD_PORT"
    SLURM_CONF=$CONF start_daemon slurmdbd slurmdbd -D
    wait_for 30 port_busy "$DBD_PORT" || { show_log_tail "$LOG/slurmdbd.log" "$LOG/slurmdbd.out"; die "slurmdbd did not start"; }
    if ! SLURM_CONF=$CONF sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
        SLURM_CONF=$CONF sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr could not register cluster $CLUSTER"
    fi
    say "started slurmdbd (pid $(<"$RUN/slurmdbd.pid"), port $DBD_PORT)"
}

start_slurmctld() {
    if alive slurmctld; then
        return 0
    fi
    port_busy "$CTLD_PORT" && die "port $CTLD_PORT (slurmctld) is taken by another program; set BENCH_SLURM_CTLD_PORT"
    SLURM_CONF=$CONF start_daemon slurmctld slurmctld -D -i
    wait_for 30 env SLURM_CONF="$CONF" scontrol ping ||
        { show_log_tail "$LOG/slurmctld.log" "$LOG/slurmctld.out"; die "slurmctld did not answer scontrol ping"; }
    say "started slurmctld (pid $(<"$RUN/slurmctld.pid"), port $CTLD_PORT)"
}

node_state() { SLURM_CONF=$CONF sinfo -h -N -n localhost -o %T 2>/dev/null | head -n 1; }

node_ready() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }

start_slurmd() {
    if ! alive slurmd; then
        port_busy "$SLURMD_PORT" && die "port $SLURMD_PORT (slurmd) is taken by another program; set BENCH_SLURM_SLURMD_PORT"
        SLURM_CONF=$CONF start_daemon slurmd slurmd -D -N localhost
        say "started slurmd (pid $(<"$RUN/slurmd.pid"))"
    fi
    if ! wait_for 20 node_ready; then
        case $(node_state) in
            drain* | down* | fail*)
                SLURM_CONF=$CONF scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
        esac
        wait_for 20 node_ready ||
            { show_log_tail "$LOG/slurmd.log" "$LOG/slurmd.out"; die "node localhost is '$(node_state)', not idle"; }
    fi
}

# ----------------------------------------------------------------------------- commands

is_up() {
    [[ -f $CONF ]] && alive slurmctld && alive slurmd && alive slurmdbd && alive mariadb && munge_ok &&
        SLURM_CONF=$CONF scontrol ping >/dev/null 2>&1
}

cmd_up() {
    local no_install=0 a
    for a in "$@"; do
        case $a in
            --no-install) no_install=1 ;;
            *) die "unknown option for up: $a (known: --no-install)" ;;
        esac
    done
    need_root up
    mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/ctld" "$STATE/slurmd"
    exec 9>"$STATE/.lock"
    flock -w 120 9 || die "another 'up' or 'down' holds $STATE/.lock"
    install_packages "$no_install"
    local t0=$SECONDS
    write_configs
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurmctld
    start_slurmd
    say "cluster '$CLUSTER' is up ($((SECONDS - t0)) s); state in $STATE"
    echo "export SLURM_CONF=$CONF"
}

cmd_down() {
    local purge=0 a jobs
    for a in "$@"; do
        case $a in
            --purge) purge=1 ;;
            *) die "unknown option for down: $a (known: --purge)" ;;
        esac
    done
    need_root down
    [[ -d $STATE ]] || { say "nothing to stop: $STATE does not exist"; return 0; }
    exec 9>"$STATE/.lock"
    flock -w 120 9 || die "another 'up' or 'down' holds $STATE/.lock"
    if alive slurmctld && [[ -f $CONF ]]; then
        jobs=$(SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
        if [[ -n ${jobs// /} ]]; then
            say "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
            wait_for 10 bash -c "[[ -z \$(SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null) ]]" || true
        fi
    fi
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon slurmdbd
    stop_daemon mariadb
    stop_daemon munged
    kill_stale_steps
    if [[ $purge == 1 ]]; then
        exec 9>&-
        rm -rf "$STATE"
        say "removed $STATE"
    fi
    say "cluster '$CLUSTER' is down"
}

kill_stale_steps() {  # job step daemons left behind by a stopped slurmd, found by their config path
    local pid
    for pid in $(pgrep -x slurmstepd 2>/dev/null || true); do
        if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "SLURM_CONF=$CONF"; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
}

cmd_status() {
    local name rc=0
    for name in munged mariadb slurmdbd slurmctld slurmd; do
        if alive "$name"; then
            printf '%-10s running (pid %s)\n' "$name" "$(<"$RUN/$name.pid")"
        elif [[ $name == munged ]] && munge_ok; then
            printf '%-10s running (not started by this script)\n' "$name"
        else
            printf '%-10s stopped\n' "$name"
            rc=3
        fi
    done
    if [[ -f $CONF ]] && alive slurmctld; then
        echo
        SLURM_CONF=$CONF sinfo || true
        echo
        SLURM_CONF=$CONF squeue || true
        echo
        echo "export SLURM_CONF=$CONF"
    fi
    return $rc
}

cmd_env() {
    if is_up; then
        echo "export SLURM_CONF=$CONF"
    else
        say "the cluster is not up (state $STATE); start it with: bash scripts/slurm_cluster.sh up"
        return 1
    fi
}

case ${1:-} in
    up) shift; cmd_up "$@" ;;
    down) shift; cmd_down "$@" ;;
    status) shift; cmd_status "$@" ;;
    env) shift; cmd_env "$@" ;;
    *)
        sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
