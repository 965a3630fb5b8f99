#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests and for trying the launcher without a cluster.
#
#   sudo slurm/local_cluster.sh up        # install Debian's packages if missing, start everything (as root)
#   sudo slurm/local_cluster.sh up --nodes 2   # two compute nodes, each a slurmd in its own network namespace
#   source /tmp/vgg-slurm/env.sh          # exports SLURM_CONF: sinfo, sbatch, sacct, submitit now work
#   sinfo -N -o '%N %T %c %m %G'          # one node, 64 CPUs (declared), gres gpu:8 (fake devices)
#   slurm/local_cluster.sh status         # daemons, sinfo, squeue; exit 0 when up, 3 when not
#   slurm/local_cluster.sh down           # cancel jobs, stop every daemon by PID, verify nothing is left
#   slurm/local_cluster.sh install        # only install the packages
#   slurm/local_cluster.sh node-fail 2    # several nodes: node2 dies (link down, SIGKILL to all in it); node-back 2
#
# Everything lives under one folder, $SLURM_LOCAL_DIR (default /tmp/vgg-slurm): a private munge key and socket,
# a private MariaDB (own datadir, socket and port $SLURM_LOCAL_DB_PORT, default 6829) behind slurmdbd so `sacct`
# works (submitit polls it), slurmctld, slurmd with 8 fake GPUs (mknod character devices in gres.conf), logs,
# pid files. Daemons are started as root without systemd. SLURM's ports are fixed: 6817 (slurmctld), 6818
# (slurmd), 6819 (slurmdbd); `up` refuses to start if one of them is taken. See slurm/README.md.
#
# Exit status: 0 ok; 1 failure (message on stderr); 2 usage; 3 `status` when not up; 77 this machine cannot host
# the cluster (not root, or packages missing and no apt-get) -- tests skip on 77 unless VGG_REQUIRE_SLURM=1.
#
# --nodes N (N >= 2): compute nodes node1..nodeN, each a slurmd in its own network namespace (hostname nodeK via
# `unshare --uts`, address 10.213.S.(10+K) on a veth to a private bridge); slurmctld, slurmdbd and MariaDB run in
# a "head" namespace (10.213.S.1), so their fixed ports do not collide with a 1-node cluster in another state
# folder. The bridge's own address (10.213.S.254) is how clients here reach the controller; nothing is routed
# off this machine. S is derived from the state folder (or $SLURM_LOCAL_SUBNET, e.g. 10.213.7). `status` and
# `down` read the node count `up` recorded; `down` also removes the namespaces, veths, bridge and /etc/netns files.
# SLURM_LOCAL_OWNER (default "manual") is recorded by `up`; the test fixture only stops a cluster it started.
set -euo pipefail

STATE="${SLURM_LOCAL_DIR:-/tmp/vgg-slurm}"
DB_PORT="${SLURM_LOCAL_DB_PORT:-6829}"
CLUSTER=vgglocal
PARTITION=debug
NODE_CPUS=64           # declared, not real: lets 8-task jobs with several CPUs each schedule on a 2-core VM
NODE_MEM_MB=1048576    # declared RealMemory (1 TiB) for the same reason; SlurmdParameters=config_overrides
NUM_GPUS=8
PORTS=(6817 6818 6819 "$DB_PORT")
NODES=1   # `up --nodes N`; status/down read what up recorded in $RUN/nodes
SLURMD_TIMEOUT_S="${SLURM_LOCAL_SLURMD_TIMEOUT:-10}"  # several nodes: SlurmdTimeout (node-failure detection)
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
NEEDED_CMDS=(slurmctld slurmd slurmdbd slurmstepd sbatch sacct sacctmgr scontrol munged munge unmunge mungekey
	mariadbd mariadb-install-db mariadb mariadb-admin)

ETC="$STATE/etc"
RUN="$STATE/run"
LOG="$STATE/log"
MUNGE="$STATE/munge"
DB="$STATE/mariadb"
CONF="$ETC/slurm.conf"
SOCK="$MUNGE/munge.socket"
DB_SOCK="$DB/mysqld.sock"
export SLURM_CONF="$CONF"
export PATH="$PATH:/usr/sbin:/sbin"

# name -> pid file; the order is the start order (down stops in reverse). With several nodes: slurmd-node1, ...
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
pidfile() { echo "$RUN/$1.pid"; }

# ---------------------------------------------------------------------------------------- several nodes: names
# One tag per state folder, so two state folders never share a namespace, interface or subnet.
TAG="$(printf '%s' "$STATE" | cksum | awk '{ printf "%04x", $1 % 65536 }')"
NS_PREFIX="vgg-$TAG"                 # namespaces vgg-TAG-head, vgg-TAG-node1, ...
BRIDGE="vgg${TAG}br"                 # interface names: at most 15 characters
SUBNET="${SLURM_LOCAL_SUBNET:-10.213.$(($(printf '%s' "$STATE" | cksum | cut -d' ' -f1) % 250))}"
HEAD_ADDR="$SUBNET.1"
BRIDGE_ADDR="$SUBNET.254"
node_name() { echo "node$1"; }
node_addr() { echo "$SUBNET.$((10 + $1))"; }
ns_head() { echo "$NS_PREFIX-head"; }
ns_node() { echo "$NS_PREFIX-node$1"; }
veth_of() { echo "vgg${TAG}$1"; }    # host side of namespace $1's veth: vggTAGh, vggTAGn1, ...

set_nodes() {
	NODES="$1"
	DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
	if [[ $NODES -gt 1 ]]; then
		DAEMONS=(munged mariadbd slurmdbd slurmctld)
		local k
		for ((k = 1; k <= NODES; k++)); do DAEMONS+=("slurmd-$(node_name "$k")"); done
	fi
}
recorded_nodes() {
	local n
	n="$(cat "$RUN/nodes" 2>/dev/null | tr -dc '0-9' || true)"
	echo "${n:-1}"
}
# The command prefix that runs daemon $1 in its network namespace (nothing: this one). nsenter, not `ip netns
# exec`: that one also remounts /sys, hiding /sys/fs/cgroup, without which slurmd refuses to start.
ns_exec() {
	[[ $NODES -gt 1 ]] || return 0
	case "$1" in
	munged) ;;
	mariadbd | slurmdbd | slurmctld) echo "nsenter --net=/run/netns/$(ns_head)" ;;
	slurmd-node*) echo "nsenter --net=/run/netns/$NS_PREFIX-${1#slurmd-}" ;;
	esac
}

die() {
	echo "error: $*" >&2
	exit 1
}
cannot() {
	echo "error: $*" >&2
	exit 77
}
say() { echo "local_cluster: $*"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------------------------------------------- processes
# True while $1 runs (a zombie waiting for init to reap it counts as gone).
alive_pid() {
	local st
	st="$(sed -E 's/^.*\) ([A-Za-z]) .*$/\1/' "/proc/$1/stat" 2>/dev/null || true)"  # comm may hold spaces
	[[ -n "$st" && "$st" != Z && "$st" != X ]]
}

# pid of daemon $1 if its pid file names a live process of that program, else nothing.
daemon_pid() {
	local f pid comm
	f="$(pidfile "$1")"
	[[ -r "$f" ]] || return 0
	pid="$(tr -dc '0-9' <"$f")"
	[[ -n "$pid" ]] && alive_pid "$pid" || return 0
	comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
	[[ "$comm" == "${1%%-*}"* ]] && echo "$pid"
	return 0
}

# Pids whose environment has our SLURM_CONF (one grep over /proc: a loop of forks is slow on 2 cores).
conf_pids() {
	grep -lzxF -- "SLURM_CONF=$CONF" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 || true
}

# slurmstepd processes of this cluster (Debian's slurmstepd can outlive slurmd): they inherit slurmd's
# SLURM_CONF, which points into our state folder.
our_stepds() {
	local pid
	for pid in $(conf_pids); do
		[[ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" == slurmstepd* ]] && echo "$pid"
	done
	return 0
}

# Processes of jobs that ran on this cluster (they carry SLURM_JOB_ID and our SLURM_CONF), except this
# script and its ancestors (a shell inside an allocation may run `down`).
our_job_procs() {
	local pid ancestors=" " a=$$
	while [[ "$a" -gt 1 ]]; do
		ancestors+="$a "
		a="$(awk '/^PPid:/ { print $2 }' "/proc/$a/status" 2>/dev/null || echo 1)"
	done
	for pid in $(conf_pids); do
		[[ "$ancestors" == *" $pid "* ]] && continue
		grep -qz '^SLURM_JOB_ID=' "/proc/$pid/environ" 2>/dev/null && echo "$pid"
	done
	return 0
}

# TCP ports from PORTS that something listens on (IPv4 or IPv6).
busy_ports() {
	local port hex
	for port in "${PORTS[@]}"; do
		hex="$(printf '%04X' "$port")"
		if awk -v h=":$hex" '$4 == "0A" && substr($2, length($2) - 4) == h { f = 1 } END { exit !f }' \
			/proc/net/tcp /proc/net/tcp6 2>/dev/null; then
			echo "$port"
		fi
	done
	return 0
}

# Send TERM to the pids given, wait up to $1 seconds, then KILL what is left.
stop_pids() {
	local timeout="$1" pid deadline
	shift
	[[ $# -gt 0 ]] || return 0
	kill -TERM "$@" 2>/dev/null || true
	deadline=$((SECONDS + timeout))
	while [[ $SECONDS -lt $deadline ]]; do
		local alive=0
		for pid in "$@"; do alive_pid "$pid" && alive=1; done
		[[ $alive -eq 0 ]] && return 0
		sleep 0.1
	done
	kill -KILL "$@" 2>/dev/null || true
	sleep 0.2
}

# Poll "$@" until it succeeds or $2 seconds pass; $1 names what we wait for, $3 the log to show on failure.
wait_for() {
	local what="$1" timeout="$2" logf="$3"
	shift 3
	local deadline=$((SECONDS + timeout))
	until "$@" >/dev/null 2>&1; do
		if [[ $SECONDS -ge $deadline ]]; then
			echo "error: $what did not come up within ${timeout}s; last lines of $logf:" >&2
			tail -n 15 "$logf" >&2 2>/dev/null || true
			exit 1
		fi
		sleep 0.1
	done
}

# ------------------------------------------------------------------------------------ several nodes: network
# Namespaces (head + one per node), their veths and the bridge, all of them ours (named with $TAG).
all_ns() {
	local k
	ns_head
	for ((k = 1; k <= NODES; k++)); do ns_node "$k"; done
}
our_netns() { ip netns list 2>/dev/null | awk '{ print $1 }' | grep -x -- "$NS_PREFIX-.*" || true; }
our_links() { ip -o link show 2>/dev/null | awk -F': ' '{ print $2 }' | sed 's/@.*//' | grep -- "^vgg$TAG" || true; }

# The hosts file bind-mounted over /etc/hosts for the slurmds (and so their jobs; `ip netns exec` would mount it
# too): nodes resolve each other (srun, gloo's and NCCL's rendezvous on MASTER_ADDR=node1) without DNS.
write_hosts() {
	local k
	printf '127.0.0.1 localhost\n%s %s\n' "$HEAD_ADDR" "$(hostname -s)"
	for ((k = 1; k <= NODES; k++)); do printf '%s %s\n' "$(node_addr "$k")" "$(node_name "$k")"; done
}

net_up() {
	local other
	# Refuse a subnet some interface here already uses (ours are removed first by net_down).
	other="$(ip -o -4 addr show 2>/dev/null | awk -v s="$SUBNET." 'index($4, s) == 1 { print $2 }' | xargs)"
	[[ -z "$other" ]] || die "subnet $SUBNET.0/24 is already used here (by $other); set SLURM_LOCAL_SUBNET=10.213.N"
	ip link add "$BRIDGE" type bridge
	ip addr add "$BRIDGE_ADDR/24" dev "$BRIDGE"
	ip link set "$BRIDGE" up
	local ns addr veth k
	for ((k = 0; k <= NODES; k++)); do
		if [[ $k -eq 0 ]]; then
			ns="$(ns_head)" addr="$HEAD_ADDR" veth="$(veth_of h)"
		else
			ns="$(ns_node "$k")" addr="$(node_addr "$k")" veth="$(veth_of "n$k")"
		fi
		ip netns add "$ns"
		mkdir -p "/etc/netns/$ns"
		write_hosts >"/etc/netns/$ns/hosts"
		ip link add "$veth" type veth peer name eth0 netns "$ns"
		ip link set "$veth" master "$BRIDGE"
		ip link set "$veth" up
		ip -n "$ns" link set lo up
		ip -n "$ns" addr add "$addr/24" dev eth0
		ip -n "$ns" link set eth0 up
	done
}

# Remove our namespaces (after killing what still runs in them), veths, bridge and /etc/netns files.
net_down() {
	local ns pids
	for ns in $(our_netns); do
		pids="$(ip netns pids "$ns" 2>/dev/null | xargs)"
		if [[ -n "$pids" ]]; then
			# shellcheck disable=SC2086
			stop_pids 2 $pids
			[[ "${1:-}" == quiet ]] || say "stopped process(es) left in namespace $ns (pid $pids)"
		fi
		ip netns del "$ns" 2>/dev/null || true
	done
	local link
	for link in $(our_links); do ip link del "$link" 2>/dev/null || true; done
	for ns in /etc/netns/"$NS_PREFIX"-*; do [[ -e "$ns" ]] && rm -rf "$ns"; done
	[[ -d /etc/netns ]] && rmdir --ignore-fail-on-non-empty /etc/netns
	return 0
}

# ------------------------------------------------------------------------------------------------------ install
install_packages() {
	local missing=() c
	for c in "${NEEDED_CMDS[@]}"; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done
	[[ ${#missing[@]} -eq 0 ]] && return 0
	[[ $EUID -eq 0 ]] || cannot "missing ${missing[*]}; run as root to install ${PACKAGES[*]} (Debian/Ubuntu)"
	command -v apt-get >/dev/null 2>&1 ||
		cannot "missing ${missing[*]} and no apt-get here; install SLURM, munge and MariaDB yourself"
	say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
	local t0 policy=/usr/sbin/policy-rc.d made_policy=0
	t0="$(now)"
	# Keep the packages' postinst scripts from starting system-wide munge/mariadb/slurm services.
	if [[ ! -e "$policy" ]]; then
		printf '#!/bin/sh\nexit 101\n' >"$policy"
		chmod 755 "$policy"
		made_policy=1
	fi
	local rc=0
	{
		DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=120 \
				--no-install-recommends "${PACKAGES[@]}"
	} >"/tmp/vgg-slurm-apt.$$.log" 2>&1 || rc=$?
	[[ $made_policy -eq 1 ]] && rm -f "$policy"
	if [[ $rc -ne 0 ]]; then
		tail -n 20 "/tmp/vgg-slurm-apt.$$.log" >&2
		die "apt-get install ${PACKAGES[*]} failed (full log: /tmp/vgg-slurm-apt.$$.log)"
	fi
	rm -f "/tmp/vgg-slurm-apt.$$.log"
	for c in "${NEEDED_CMDS[@]}"; do command -v "$c" >/dev/null 2>&1 || die "$c still missing after install"; done
	say "installed in $(elapsed "$t0") s"
}

# ------------------------------------------------------------------------------------------------------- config
write_configs() {
	local host
	host="$(hostname -s)"
	mkdir -p "$ETC" "$RUN" "$LOG" "$MUNGE" "$DB" "$STATE/spool/ctld" "$STATE/spool/d" "$STATE/dev"
	# One node here at 127.0.0.1; several: node1..nodeN in their namespaces, the controller at the head's address.
	local ctl_addr=127.0.0.1 slurmd_files="$(pidfile slurmd)|$LOG/slurmd.log|$STATE/spool/d" nodes_conf gres_conf
	if [[ $NODES -gt 1 ]]; then
		ctl_addr="$HEAD_ADDR"
		slurmd_files="$RUN/slurmd-%n.pid|$LOG/slurmd-%n.log|$STATE/spool/d-%n"
		nodes_conf="" gres_conf="AutoDetect=off"
		local k
		for ((k = 1; k <= NODES; k++)); do
			mkdir -p "$STATE/spool/d-$(node_name "$k")"
			nodes_conf+="NodeName=$(node_name "$k") NodeAddr=$(node_addr "$k") CPUs=$NODE_CPUS Sockets=1 CoresPerSocket=$NODE_CPUS ThreadsPerCore=1 RealMemory=$NODE_MEM_MB Gres=gpu:$NUM_GPUS State=UNKNOWN"$'\n'
		done
		gres_conf+=$'\n'"NodeName=node[1-$NODES] Name=gpu File=$STATE/dev/nvidia[0-$((NUM_GPUS - 1))]"
	else
		nodes_conf="NodeName=$host NodeAddr=127.0.0.1 CPUs=$NODE_CPUS Sockets=1 CoresPerSocket=$NODE_CPUS ThreadsPerCore=1 RealMemory=$NODE_MEM_MB Gres=gpu:$NUM_GPUS State=UNKNOWN"
		gres_conf="AutoDetect=off"$'\n'"NodeName=$host Name=gpu File=$STATE/dev/nvidia[0-$((NUM_GPUS - 1))]"
	fi
	local d_pid d_log d_spool slurmd_timeout=""
	IFS='|' read -r d_pid d_log d_spool <<<"$slurmd_files"
	# Several nodes: a node whose slurmd stops answering is DOWN after this many seconds (default 300), and its
	# jobs end (NODE_FAIL; requeued if they allow it). Bounds how long a job waits on a dead node.
	[[ $NODES -gt 1 ]] && slurmd_timeout="SlurmdTimeout=$SLURMD_TIMEOUT_S"

	# Fake GPUs: gres.conf File= must name character devices; nothing ever opens them.
	local i
	for ((i = 0; i < NUM_GPUS; i++)); do
		[[ -c "$STATE/dev/nvidia$i" ]] || mknod -m 666 "$STATE/dev/nvidia$i" c 195 "$i"
	done

	cat >"$CONF" <<-EOF
		# Written by slurm/local_cluster.sh; regenerated on every \`up\`.
		ClusterName=$CLUSTER
		SlurmctldHost=$host($ctl_addr)
		SlurmUser=root
		SlurmdUser=root
		SlurmctldPort=6817
		SlurmdPort=6818
		AuthType=auth/munge
		AuthInfo=socket=$SOCK
		CredType=cred/munge
		StateSaveLocation=$STATE/spool/ctld
		SlurmdSpoolDir=$d_spool
		SlurmctldPidFile=$(pidfile slurmctld)
		SlurmdPidFile=$d_pid
		SlurmctldLogFile=$LOG/slurmctld.log
		SlurmdLogFile=$d_log
		SlurmctldDebug=info
		SlurmdDebug=info
		# No cgroups: proctrack/cgroup needs the freezer controller, which these VMs lack.
		ProctrackType=proctrack/linuxproc
		TaskPlugin=task/none
		SelectType=select/cons_tres
		SelectTypeParameters=CR_Core_Memory
		DefMemPerCPU=1024
		# Trust the node line below over the hardware (2 cores here), so real-sized requests schedule.
		SlurmdParameters=config_overrides
		GresTypes=gpu
		SchedulerType=sched/backfill
		# Schedule a batch job when it is submitted (the default lets it wait up to 3 s).
		SchedulerParameters=batch_sched_delay=0
		MpiDefault=none
		SwitchType=switch/none
		JobRequeue=1
		ReturnToService=2
		$slurmd_timeout
		KillWait=5
		InactiveLimit=0
		MinJobAge=300
		MailProg=/bin/true
		JobCompType=jobcomp/none
		JobAcctGatherType=jobacct_gather/none
		AccountingStorageType=accounting_storage/slurmdbd
		AccountingStorageHost=$ctl_addr
		AccountingStoragePort=6819
		# slurmctld authenticates to slurmdbd through munge; this is how it finds our private munged.
		AccountingStoragePass=$SOCK
		AccountingStorageTRES=gres/gpu
		$nodes_conf
		PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
	EOF

	printf '%s\n' "$gres_conf" >"$ETC/gres.conf"

	if [[ ! -s "$DB/password" ]]; then
		(umask 077 && head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$DB/password")
	fi
	(
		umask 077
		cat >"$ETC/slurmdbd.conf" <<-EOF
			AuthType=auth/munge
			AuthInfo=socket=$SOCK
			DbdHost=localhost
			DbdAddr=$ctl_addr
			DbdPort=6819
			SlurmUser=root
			LogFile=$LOG/slurmdbd.log
			PidFile=$(pidfile slurmdbd)
			StorageType=accounting_storage/mysql
			StorageHost=127.0.0.1
			StoragePort=$DB_PORT
			StorageUser=slurm
			StoragePass=$(cat "$DB/password")
			StorageLoc=slurm_acct_db
		EOF
	)
	chmod 600 "$ETC/slurmdbd.conf"

	cat >"$STATE/env.sh" <<-EOF
		# source me: clients (sinfo, sbatch, sacct, submitit) need SLURM_CONF, else "Could not establish a
		# configuration source".
		export SLURM_CONF=$CONF
		export SLURM_LOCAL_DIR=$STATE
		# every node of this cluster is this machine: its /tmp is theirs (slurm/launch.py accepts a /tmp run folder)
		export VGG_ONE_MACHINE_CLUSTER=1
		case ":\$PATH:" in *:/usr/sbin:*) ;; *) export PATH="\$PATH:/usr/sbin" ;; esac
	EOF
}

# ------------------------------------------------------------------------------------------------------ daemons
start_failed() {
	echo "error: $1 failed to start; last lines of $2:" >&2
	tail -n 15 "$2" >&2 2>/dev/null || true
	exit 1
}

start_munged() {
	if [[ ! -s "$MUNGE/munge.key" ]]; then
		mungekey --create --keyfile="$MUNGE/munge.key" >/dev/null
		chmod 600 "$MUNGE/munge.key"
	fi
	rm -f "$SOCK" "$SOCK.lock"
	# --force: the socket lives under a 0700 folder below /tmp, which munged otherwise refuses.
	munged --force --socket="$SOCK" --key-file="$MUNGE/munge.key" --pid-file="$(pidfile munged)" \
		--log-file="$LOG/munged.log" --seed-file="$MUNGE/munged.seed" </dev/null >>"$LOG/munged.log" 2>&1 9>&- ||
		start_failed munged "$LOG/munged.log"
	wait_for "munged" 10 "$LOG/munged.log" bash -c "munge -n -S '$SOCK' | unmunge -S '$SOCK'"
}

db_sql() { mariadb --no-defaults --socket="$DB_SOCK" -uroot -N -B -e "$1"; }

start_mariadbd() {
	local fresh=0
	if [[ ! -d "$DB/data/mysql" ]]; then
		fresh=1
		rm -rf "$DB/data"
		mariadb-install-db --no-defaults --user=root --datadir="$DB/data" --skip-test-db \
			--auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 ||
			{
				tail -n 15 "$LOG/mariadb-install.log" >&2
				die "mariadb-install-db failed (log: $LOG/mariadb-install.log)"
			}
	fi
	# Our own server: no system config, its own socket/port, loopback only.
	$(ns_exec mariadbd) setsid mariadbd --no-defaults --user=root --datadir="$DB/data" --socket="$DB_SOCK" --port="$DB_PORT" \
		--bind-address=127.0.0.1 --skip-name-resolve --pid-file="$(pidfile mariadbd)" \
		--log-error="$LOG/mariadbd.log" --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
		--skip-log-bin </dev/null >>"$LOG/mariadbd.log" 2>&1 9>&- &
	wait_for "mariadbd" 60 "$LOG/mariadbd.log" mariadb-admin --no-defaults --socket="$DB_SOCK" -uroot ping
	wait_for "mariadbd pid file" 10 "$LOG/mariadbd.log" test -s "$(pidfile mariadbd)"
	if [[ $fresh -eq 1 ]] || [[ -z "$(db_sql "SELECT 1 FROM mysql.user WHERE user='slurm'")" ]]; then
		db_sql "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
			CREATE OR REPLACE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$(cat "$DB/password")';
			GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
	fi
}

start_slurmdbd() {
	$(ns_exec slurmdbd) slurmdbd </dev/null >>"$LOG/slurmdbd.log" 2>&1 9>&- || start_failed slurmdbd "$LOG/slurmdbd.log"
	wait_for "slurmdbd" 30 "$LOG/slurmdbd.log" sacctmgr -n list cluster format=cluster
	if [[ -z "$(sacctmgr -n -P list cluster format=cluster where cluster="$CLUSTER")" ]]; then
		sacctmgr -i add cluster "$CLUSTER" >/dev/null
	fi
}

start_slurmctld() {
	$(ns_exec slurmctld) slurmctld -f "$CONF" </dev/null >>"$LOG/slurmctld.log" 2>&1 9>&- || start_failed slurmctld "$LOG/slurmctld.log"
	wait_for "slurmctld" 30 "$LOG/slurmctld.log" scontrol ping
}

# Every node idle (or running jobs) in sinfo.
node_ready() {
	local states
	states="$(sinfo -h -N -o '%T' 2>/dev/null || true)"
	[[ "$(grep -cE '^(idle|mixed|allocated)' <<<"$states")" -eq $NODES ]]
}

# Nodes left DOWN/DRAINED by an earlier unclean stop are put back into service.
resume_down_nodes() {
	local line
	sleep 0.3
	while read -r line; do
		[[ "$line" == *" down"* || "$line" == *" drain"* ]] &&
			scontrol update nodename="${line%% *}" state=resume >/dev/null 2>&1
	done < <(sinfo -h -N -o '%N %T' 2>/dev/null || true)
	return 0
}

# slurmd of node $1 in its own network namespace (address), UTS namespace (hostname nodeK, what jobs see) and
# mount namespace (for the one bind mount of the namespace's hosts file over /etc/hosts).
start_node_slurmd() {
	local name ns
	name="$(node_name "$1")"
	ns="$(ns_node "$1")"
	nsenter --net="/run/netns/$ns" unshare --uts --mount bash -c \
		"mount --bind /etc/netns/$ns/hosts /etc/hosts && hostname $name && exec slurmd -f '$CONF' -N $name" \
		</dev/null >>"$LOG/slurmd-$name.log" 2>&1 9>&- || start_failed "slurmd $name" "$LOG/slurmd-$name.log"
}

start_slurmd() {
	if [[ $NODES -gt 1 ]]; then
		local k
		for ((k = 1; k <= NODES; k++)); do start_node_slurmd "$k"; done
		resume_down_nodes
		wait_for "slurmd on $NODES nodes (all idle in sinfo)" 30 "$LOG/slurmd-node1.log" node_ready
		return 0
	fi
	slurmd -f "$CONF" </dev/null >>"$LOG/slurmd.log" 2>&1 9>&- || start_failed slurmd "$LOG/slurmd.log"
	resume_down_nodes
	wait_for "slurmd (node idle in sinfo)" 30 "$LOG/slurmd.log" node_ready
}

running_daemons() {
	local d
	for d in "${DAEMONS[@]}"; do [[ -n "$(daemon_pid "$d")" ]] && echo "$d"; done
	return 0
}

all_up() {
	[[ "$(running_daemons | wc -l)" -eq ${#DAEMONS[@]} ]] && scontrol ping >/dev/null 2>&1
}

# -------------------------------------------------------------------------------------------------------- verbs
lock() {
	mkdir -p "$STATE"
	chmod 700 "$STATE"
	exec 9>"$STATE/.lock"
	flock 9
}

cmd_up() {
	[[ $EUID -eq 0 ]] || cannot "must run as root (daemons run as root without systemd)"
	lock
	install_packages
	local want="$NODES" had
	had="$(recorded_nodes)"
	set_nodes "$had"
	if [[ -n "$(running_daemons)" && "$had" -ne "$want" ]]; then
		die "a $had-node cluster is up in $STATE; run '$0 down' first, or use another SLURM_LOCAL_DIR for $want node(s)"
	fi
	if all_up; then
		say "already up ($STATE, $NODES node(s)); source $STATE/env.sh"
		return 0
	fi
	if [[ -n "$(running_daemons)" || -n "$(our_netns)" ]]; then
		say "partly up ($(running_daemons | xargs) $(our_netns | xargs)); restarting"
		stop_all quiet
	fi
	set_nodes "$want"
	local busy=""
	[[ $NODES -gt 1 ]] || busy="$(busy_ports | xargs)"  # several nodes: the ports are in our own namespaces
	if [[ -n "$busy" ]]; then
		local detail=""
		command -v ss >/dev/null 2>&1 && detail="$(ss -Hltnp 2>/dev/null | grep -E ":(${busy// /|})\b" || true)"
		die "port(s) $busy in use by another program (SLURM's ports are fixed: 6817-6819, MariaDB $DB_PORT); ${detail:-see ss -ltnp}"
	fi
	local t0
	t0="$(now)"
	# A failed start leaves nothing running behind.
	trap 'echo "local_cluster: up failed; stopping what it started" >&2; stop_all quiet' EXIT
	mkdir -p "$RUN"
	echo "$NODES" >"$RUN/nodes"  # before anything starts: a failed up is cleaned up by down too
	[[ $NODES -gt 1 ]] && net_up
	write_configs
	start_munged
	start_mariadbd
	start_slurmdbd
	start_slurmctld
	start_slurmd
	trap - EXIT
	# Who started it: the test fixture stops only a cluster a test session started (SLURM_LOCAL_OWNER=pytest).
	echo "${SLURM_LOCAL_OWNER:-manual}" >"$RUN/owner"
	if [[ $NODES -gt 1 ]]; then
		say "up in $(elapsed "$t0") s: cluster $CLUSTER, partition $PARTITION, nodes node[1-$NODES] at $(node_addr 1)..$(node_addr "$NODES") (namespaces $NS_PREFIX-node*, bridge $BRIDGE $BRIDGE_ADDR, controller $HEAD_ADDR), each $NODE_CPUS CPUs (declared), gres gpu:$NUM_GPUS"
	else
		say "up in $(elapsed "$t0") s: cluster $CLUSTER, partition $PARTITION, node $(hostname -s) with $NODE_CPUS CPUs (declared), gres gpu:$NUM_GPUS"
	fi
	say "state, logs and configs under $STATE"
	say "use it:  source $STATE/env.sh && sinfo && sbatch -n 2 --gres=gpu:2 --wrap 'srun printenv CUDA_VISIBLE_DEVICES'"
	say "stop it: $0 down"
}

# Cancel jobs, stop daemons (reverse start order) and leftover step daemons / job processes.
stop_all() {
	local d pid
	if [[ -n "$(daemon_pid slurmctld)" ]]; then
		local jobs
		jobs="$(squeue -h -o %A 2>/dev/null | xargs || true)"
		if [[ -n "$jobs" ]]; then
			[[ "${1:-}" == quiet ]] || say "cancelling job(s) $jobs"
			# shellcheck disable=SC2086
			scancel $jobs 2>/dev/null || true
			# Give slurmd time to end the steps cleanly (KillWait=5); without slurmd they never finish.
			local deadline=$((SECONDS + 15))
			while [[ -n "$(running_daemons | grep '^slurmd')" && -n "$(squeue -h -o %A 2>/dev/null)" && $SECONDS -lt $deadline ]]; do
				sleep 0.2
			done
		fi
	fi
	for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
		d="${DAEMONS[$i]}"
		pid="$(daemon_pid "$d")"
		if [[ -n "$pid" ]]; then
			stop_pids 20 "$pid"
			[[ "${1:-}" == quiet ]] || say "stopped $d (pid $pid)"
		fi
		if [[ "$d" == slurmd* ]]; then
			local stray
			stray="$(our_stepds | xargs)"
			if [[ -n "$stray" ]]; then
				# shellcheck disable=SC2086
				stop_pids 1 $stray
				[[ "${1:-}" == quiet ]] || say "stopped slurmstepd(s) left behind by slurmd (pid $stray)"
			fi
			stray="$(our_job_procs | xargs)"
			if [[ -n "$stray" ]]; then
				# shellcheck disable=SC2086
				stop_pids 1 $stray
				[[ "${1:-}" == quiet ]] || say "stopped job process(es) left behind (pid $stray)"
			fi
		fi
		rm -f "$(pidfile "$d")"
	done
	net_down "${1:-}"  # namespaces, veths, bridge of a several-node cluster (nothing for one node)
	rm -f "$RUN/nodes"
}

cmd_down() {
	[[ $EUID -eq 0 ]] || cannot "must run as root"
	[[ -d "$STATE" ]] || {
		say "not up (no $STATE)"
		return 0
	}
	lock
	set_nodes "$(recorded_nodes)"
	local t0
	t0="$(now)"
	if [[ -z "$(running_daemons)" ]]; then say "no daemon of ours was running"; fi
	stop_all
	# Verify: no daemon, step daemon or job process of ours, no listener on our ports.
	local left=() d busy
	for d in "${DAEMONS[@]}"; do [[ -n "$(daemon_pid "$d")" ]] && left+=("$d"); done
	[[ -n "$(our_stepds)" ]] && left+=("slurmstepd $(our_stepds | xargs)")
	[[ -n "$(our_job_procs)" ]] && left+=("job processes $(our_job_procs | xargs)")
	if [[ $NODES -eq 1 ]]; then
		busy="$(busy_ports | xargs)"
		[[ -n "$busy" ]] && left+=("listeners on port(s) $busy")
	fi
	[[ -n "$(our_netns)" ]] && left+=("network namespaces $(our_netns | xargs)")
	[[ -n "$(our_links)" ]] && left+=("interfaces $(our_links | xargs)")
	[[ ${#left[@]} -eq 0 ]] || die "down left behind: ${left[*]}"
	rm -f "$RUN/owner"
	if [[ $NODES -gt 1 ]]; then
		say "down in $(elapsed "$t0") s; no process, namespace ($NS_PREFIX-*), veth or bridge ($BRIDGE) of ours left (state kept in $STATE)"
	else
		say "down in $(elapsed "$t0") s; no process of ours and no listener on ${PORTS[*]} left (state kept in $STATE)"
	fi
}

cmd_status() {
	local d pid rc=0
	set_nodes "$(recorded_nodes)"
	for d in "${DAEMONS[@]}"; do
		pid="$(daemon_pid "$d")"
		if [[ -n "$pid" ]]; then
			local ns
			ns="$(ip netns identify "$pid" 2>/dev/null || true)"
			printf '%-12s running (pid %s)%s\n' "$d" "$pid" "${ns:+ in network namespace $ns}"
		else
			printf '%-12s not running\n' "$d"
			rc=3
		fi
	done
	if [[ -n "$(daemon_pid slurmctld)" ]]; then
		sinfo -N -o '%N %P %T %c %m %G' || rc=3
		squeue || true
	fi
	echo "state: $STATE (source $STATE/env.sh)"
	return $rc
}

# node-fail K: node K dies as a machine would: its link goes down first (nothing it sends reaches the others,
# no FIN/RST), then every process in its namespace (slurmd, step daemons, the job's tasks) gets SIGKILL; no
# signal reaches the job. node-back K: link up, slurmd started again (ReturnToService=2 makes it idle again).
node_arg() {
	set_nodes "$(recorded_nodes)"
	[[ $NODES -gt 1 ]] || die "node-fail/node-back need a cluster of several nodes (up --nodes N)"
	[[ "${1:-}" =~ ^[0-9]+$ && $1 -ge 1 && $1 -le $NODES ]] || die "node must be 1..$NODES, got '${1:-}'"
}

cmd_node_fail() {
	[[ $EUID -eq 0 ]] || cannot "must run as root"
	node_arg "$1"
	local ns pids
	ns="$(ns_node "$1")"
	ip link set "$(veth_of "n$1")" down
	pids="$(ip netns pids "$ns" | xargs)"
	# shellcheck disable=SC2086
	[[ -z "$pids" ]] || kill -KILL $pids
	rm -f "$(pidfile "slurmd-$(node_name "$1")")"
	say "$(node_name "$1") failed: link down, SIGKILL to pid(s) ${pids:-none} in $ns"
}

cmd_node_back() {
	[[ $EUID -eq 0 ]] || cannot "must run as root"
	node_arg "$1"
	lock
	ip link set "$(veth_of "n$1")" up
	[[ -n "$(daemon_pid "slurmd-$(node_name "$1")")" ]] || start_node_slurmd "$1"
	local name
	name="$(node_name "$1")"
	wait_for "$name idle in sinfo" 60 "$LOG/slurmd-$name.log" bash -c \
		"sinfo -h -n $name -o %T | grep -qE '^(idle|mixed|allocated)'"
	say "$name is back"
}

VERB="${1:-}"
[[ $# -gt 0 ]] && shift
NODE_ARG=""
[[ "$VERB" == node-fail || "$VERB" == node-back ]] && {
	NODE_ARG="${1:-}"
	[[ $# -gt 0 ]] && shift
}
while [[ $# -gt 0 ]]; do
	case "$1" in
	--nodes)
		[[ "$VERB" == up && "${2:-}" =~ ^[1-9][0-9]?$ ]] || {
			echo "usage: $0 up [--nodes N]   (N: 1 to 99 compute nodes; status and down need no --nodes)" >&2
			exit 2
		}
		NODES="$2"
		shift 2
		;;
	*)
		echo "usage: $0 up [--nodes N]|down|status|install   (unknown argument $1)" >&2
		exit 2
		;;
	esac
done

case "$VERB" in
up) cmd_up ;;
down) cmd_down ;;
node-fail) cmd_node_fail "$NODE_ARG" ;;
node-back) cmd_node_back "$NODE_ARG" ;;
status) cmd_status ;;
install)
	[[ $EUID -eq 0 ]] || cannot "must run as root to install packages"
	lock
	install_packages
	;;
*)
	echo "usage: $0 up [--nodes N]|down|status|install|node-fail K|node-back K   (state in \$SLURM_LOCAL_DIR, default /tmp/vgg-slurm)" >&2
	exit 2
	;;
esac
