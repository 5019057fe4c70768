#!/usr/bin/env bash
# Real test "HPC facilities" on this machine: each is its own SLURM cluster (slurmctld + slurmd,
# own munge key, own ports and state) with its own sshd on loopback and a key-only login user.
#
#   bash scripts/facilities.sh install  # Debian packages and the jobs' Python environment
#   bash scripts/facilities.sh up       # install if needed, start what is not running
#   bash scripts/facilities.sh down     # stop exactly what `up` started (by pidfile)
#   bash scripts/facilities.sh status
#
# `up` is idempotent. It writes $XFFL_FACILITIES_DIR/facilities.json (what the tests read),
# keys/id_ed25519 (the client key), keys/known_hosts (the facilities' host keys) and a Python
# environment with xffl-cwl that the login users' jobs run in (env/: what a facility's container
# image would hold). Needs root and Debian (apt-get), no systemd.
#
# The facilities also run podman, rootless for their login users (overlay storage in each user's home);
# when containers/build.sh has saved the xffl-cwl image, `up` loads it into each user's storage (once),
# as a site would place an image for its users.
#
# Knobs: XFFL_FACILITIES_DIR (/var/tmp/xffl-facilities), XFFL_FACILITIES ("leonardo lumi"),
#        XFFL_NODE_CPUS (4: more than the cores, so several 1-CPU jobs run at once),
#        XFFL_IMAGE_ARCHIVE (/var/tmp/xffl-cwl-build/images/xffl-cwl-VERSION.tar).
set -euo pipefail

BASE=${XFFL_FACILITIES_DIR:-/var/tmp/xffl-facilities}
NAMES=${XFFL_FACILITIES:-"leonardo lumi"}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PACKAGES=(slurmctld slurmd slurm-client munge openssh-server openssh-client procps python3-venv podman runc uidmap debootstrap)
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO/pyproject.toml" | head -1)
ARCHIVE=${XFFL_IMAGE_ARCHIVE:-/var/tmp/xffl-cwl-build/images/xffl-cwl-$VERSION.tar}

log() { printf '[facilities %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

alive() {  # alive PIDFILE EXE: the pidfile names a live, non-zombie process running EXE
  local pid st
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) && [[ $pid =~ ^[0-9]+$ ]] || return 1
  st=$(ps -o stat= -p "$pid" 2>/dev/null) || return 1
  [[ $st != Z* ]] && [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$(readlink -f "$2")" ]
}

wait_for() {  # wait_for SECONDS CMD...
  local end=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt "$end" ] || return 1; sleep 0.2; done
}

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The jobs run as the login users, who cannot read root's Python: give them their own environment
# (the stand-in for a facility's container image), with this checkout of xffl-cwl installed.
python_env() {
  local env=$BASE/env stamp runners
  # cwltool and cwltest as the test extra pins them: a login user runs `cwltool --podman` (rootless only)
  runners=$(python3 -c 'import sys, tomllib; t = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]["test"]; print(" ".join(r for r in t if r.startswith(("cwltool", "cwltest"))))' "$REPO/pyproject.toml")
  # rebuilt only when the dependencies change; the package itself is reinstalled every time
  stamp=$( (sed -n '/^dependencies = \[/,/^\]/p' "$REPO/pyproject.toml"; echo "$runners") | sha256sum | cut -c1-16)
  if [ ! -x "$env/bin/python" ] || [ "$(cat "$env/.deps" 2>/dev/null)" != "$stamp" ]; then
    log "building the facilities' Python environment in $env (once; about a minute)"
    rm -rf "$env"
    /usr/bin/python3 -m venv "$env"
    # shellcheck disable=SC2086
    "$env/bin/pip" install --disable-pip-version-check "torch==2.13.0" "$REPO" $runners >"$BASE/env-install.log" 2>&1 \
      || { tail -20 "$BASE/env-install.log" >&2; die "installing into $env failed (log: $BASE/env-install.log)"; }
    echo "$stamp" >"$env/.deps"
  else
    "$env/bin/pip" install --disable-pip-version-check --no-deps --force-reinstall "$REPO" >"$BASE/env-install.log" 2>&1 \
      || { tail -20 "$BASE/env-install.log" >&2; die "installing xffl-cwl into $env failed (log: $BASE/env-install.log)"; }
  fi
  chmod -R a+rX "$env"
}

facility_up() {  # facility_up NAME INDEX
  local name=$1 i=$2
  local F=$BASE/fac/$name ip=127.0.0.$((10 + i)) ctld=$((6817 + 10 * (i - 1))) ssh_port=$((2221 + i))
  local slurmd_port=$((ctld + 1)) node=${name}-n1 user=hpc_${name} conf=$BASE/fac/$name/etc/slurm.conf
  local msock=$F/munge/munge.socket home
  mkdir -p "$F"/{etc,state,spool,log,run,munge,ssh}
  chown slurm:slurm "$F/state" "$F/log" "$F/run"
  chmod 755 "$F" "$F/run" "$F/log"
  chown munge:munge "$F/munge" && chmod 755 "$F/munge"

  id "$user" >/dev/null 2>&1 || useradd -m -s /bin/bash "$user"
  usermod -p '*' "$user"  # no password, but not locked: sshd (UsePAM no) refuses locked accounts
  home=$(getent passwd "$user" | cut -d: -f6)
  install -d -m 700 -o "$user" -g "$user" "$home/.ssh"
  install -m 600 -o "$user" -g "$user" "$BASE/keys/id_ed25519.pub" "$home/.ssh/authorized_keys"
  install -d -m 755 -o "$user" -g "$user" "$home/work"
  podman_user "$user" "$home"

  [ -s "$F/munge/munge.key" ] || dd if=/dev/urandom of="$F/munge/munge.key" bs=1024 count=1 status=none
  chown munge:munge "$F/munge/munge.key" && chmod 400 "$F/munge/munge.key"

  cat >"$conf.tmp" <<EOF
# facility $name, written by scripts/facilities.sh
ClusterName=$name
SlurmctldHost=localhost($ip)
SlurmctldPort=$ctld
SlurmdPort=$slurmd_port
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$msock
StateSaveLocation=$F/state
SlurmdSpoolDir=$F/spool
SlurmctldPidFile=$F/run/slurmctld.pid
SlurmdPidFile=$F/run/slurmd.pid
SlurmctldLogFile=$F/log/slurmctld.log
SlurmdLogFile=$F/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$F/log/jobcomp.txt
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=600
$EXTRA_PARAMS
NodeName=$node NodeAddr=$ip CPUs=$NODE_CPUS RealMemory=$NODE_MEM State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$conf.tmp" "$conf" && chmod 644 "$conf"

  [ -f "$F/ssh/host_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$F/ssh/host_key"
  cat >"$F/ssh/sshd_config" <<EOF
Port $ssh_port
ListenAddress 127.0.0.1
HostKey $F/ssh/host_key
PidFile $F/run/sshd.pid
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UsePAM no
AllowUsers $user
SetEnv SLURM_CONF=$conf XFFL_FACILITY=$name
MaxSessions 50
MaxStartups 50:30:100
Subsystem sftp internal-sftp
EOF
  /usr/sbin/sshd -t -f "$F/ssh/sshd_config" || die "bad sshd_config for $name"

  if ! alive "$F/munge/munged.pid" /usr/sbin/munged; then
    rm -f "$msock" "$msock.lock"
    runuser -u munge -- /usr/sbin/munged --socket="$msock" --key-file="$F/munge/munge.key" \
      --pid-file="$F/munge/munged.pid" --log-file="$F/munge/munged.log" --seed-file="$F/munge/munged.seed"
    wait_for 10 munge -S "$msock" -n || die "munged of $name did not start ($F/munge/munged.log)"
  fi
  if ! alive "$F/run/slurmctld.pid" /usr/sbin/slurmctld; then
    /usr/sbin/slurmctld -f "$conf"
    wait_for 10 alive "$F/run/slurmctld.pid" /usr/sbin/slurmctld || die "slurmctld of $name died ($F/log/slurmctld.log)"
  fi
  if ! alive "$F/run/slurmd.pid" /usr/sbin/slurmd; then
    /usr/sbin/slurmd -f "$conf" -N "$node"
    wait_for 10 alive "$F/run/slurmd.pid" /usr/sbin/slurmd || die "slurmd of $name died ($F/log/slurmd.log)"
  fi
  if ! alive "$F/run/sshd.pid" /usr/sbin/sshd; then
    /usr/sbin/sshd -f "$F/ssh/sshd_config" -E "$F/log/sshd.log"
    wait_for 10 alive "$F/run/sshd.pid" /usr/sbin/sshd || die "sshd of $name did not start ($F/log/sshd.log)"
  fi
  wait_for 60 sh -c "SLURM_CONF=$conf sinfo -h -n $node -o %T | grep -Eq '^(idle|mixed|allocated|completing)'" \
    || die "node $node of $name is not ready ($F/log/slurmd.log)"
  printf '[127.0.0.1]:%s %s\n' "$ssh_port" "$(cut -d' ' -f1,2 "$F/ssh/host_key.pub")" >>"$BASE/keys/known_hosts.tmp"
  ENTRIES+=("{\"name\": \"$name\", \"host\": \"127.0.0.1\", \"port\": $ssh_port, \"username\": \"$user\", \"home\": \"$home\", \"workdir\": \"$home/work\", \"slurm_conf\": \"$conf\", \"partition\": \"debug\", \"node\": \"$node\", \"jobcomp\": \"$F/log/jobcomp.txt\"}")
  log "$name: SLURM cluster $name (node $node, ctld :$ctld), sshd 127.0.0.1:$ssh_port, user $user"
}

# podman on this kind of machine (no systemd, cgroups v1, no /dev/net/tun): runc, no network namespace
# of its own by default, and ulimits it may set. Written only where no site configuration exists.
podman_config() {
  [ -e /etc/containers/containers.conf ] && return 0
  mkdir -p /etc/containers
  cat >/etc/containers/containers.conf <<EOF
# written by xffl-cwl's scripts/facilities.sh
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
netns = "none"
[engine]
runtime = "runc"
EOF
}

podman_user() {  # podman_user USER HOME: rootless podman with the kernel's overlay, and the image
  local user=$1 home=$2 id
  grep -q "^$user:" /etc/subuid || usermod --add-subuids 300000-365535 --add-subgids 300000-365535 "$user"
  install -d -m 755 -o "$user" -g "$user" "$home/.config" "$home/.config/containers"
  printf '[storage]\ndriver = "overlay"\n' >"$home/.config/containers/storage.conf"
  chown "$user:" "$home/.config/containers/storage.conf"
  [ -s "$ARCHIVE" ] || return 0
  id=$(tar -xOf "$ARCHIVE" manifest.json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["Config"].split("/")[-1].split(".")[0])')
  if [ "$(cd / && runuser -u "$user" -- podman image inspect --format '{{.Id}}' "localhost/xffl-cwl:$VERSION" 2>/dev/null)" != "$id" ]; then
    log "loading $ARCHIVE into the podman storage of $user"
    if ! (cd / && runuser -u "$user" -- podman load -q -i "$ARCHIVE" >/dev/null 2>"$BASE/podman-load-$user.log"); then
      # a storage left half-written by a killed podman (a layer still mounted in the user's namespace):
      # stop the user's podman namespace, start the storage afresh and load again
      log "the podman storage of $user is unusable ($(tail -1 "$BASE/podman-load-$user.log" | cut -c1-160)); resetting it"
      (cd / && runuser -u "$user" -- podman system migrate && runuser -u "$user" -- podman system reset -f) >/dev/null 2>&1 || true
      (cd / && runuser -u "$user" -- podman load -q -i "$ARCHIVE" >/dev/null 2>"$BASE/podman-load-$user.log") \
        || die "podman load for $user failed ($BASE/podman-load-$user.log)"
    fi
    (cd / && runuser -u "$user" -- podman image prune -f >/dev/null 2>&1) || true  # the image it replaced
  fi
}

install_software() {
  [ "$(id -u)" = 0 ] || die "must run as root (it installs Debian packages and creates the login users)"
  install_packages
  podman_config
  mkdir -p "$BASE"
  chmod 755 "$BASE"
  python_env
}

up() {
  install_software
  mkdir -p "$BASE/keys" "$BASE/fac" /run/sshd
  chmod 755 "$BASE" "$BASE/fac" && chmod 755 /run/sshd
  [ -f "$BASE/keys/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C xffl-cwl-tests -f "$BASE/keys/id_ed25519"
  local hw hw_cpus hw_mem
  hw=$(slurmd -C 2>/dev/null | head -1)
  hw_cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
  hw_mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
  NODE_CPUS=${XFFL_NODE_CPUS:-4}
  NODE_MEM=$(( hw_mem * 9 / 10 ))  # a little below physical, or the node drains with "Low RealMemory"
  EXTRA_PARAMS=""
  [ "$NODE_CPUS" -gt "$hw_cpus" ] && EXTRA_PARAMS="SlurmdParameters=config_overrides"
  ENTRIES=()
  : >"$BASE/keys/known_hosts.tmp"
  local i=0 name
  for name in $NAMES; do
    i=$((i + 1))
    facility_up "$name" "$i"
  done
  mv "$BASE/keys/known_hosts.tmp" "$BASE/keys/known_hosts" && chmod 644 "$BASE/keys/known_hosts"
  local joined
  joined=$(printf ',\n    %s' "${ENTRIES[@]}")
  printf '{\n  "key": "%s",\n  "known_hosts": "%s",\n  "python_env": "%s",\n  "facilities": [%s\n  ]\n}\n' \
    "$BASE/keys/id_ed25519" "$BASE/keys/known_hosts" "$BASE/env" "${joined:1}" >"$BASE/facilities.json.tmp"
  mv "$BASE/facilities.json.tmp" "$BASE/facilities.json"
  echo "$NAMES" >"$BASE/facilities.list"
  log "up: $BASE/facilities.json"
}

stop() {  # stop PIDFILE EXE
  local pid n
  alive "$1" "$2" || { rm -f "$1"; return 0; }
  pid=$(cat "$1")
  kill -TERM "$pid"
  for n in $(seq 50); do alive "$1" "$2" || break; sleep 0.1; done
  alive "$1" "$2" && kill -KILL "$pid"
  rm -f "$1"
}

down() {
  local name F conf jobs
  for name in $(cat "$BASE/facilities.list" 2>/dev/null || echo "$NAMES"); do
    F=$BASE/fac/$name
    [ -d "$F" ] || continue
    conf=$F/etc/slurm.conf
    if alive "$F/run/slurmctld.pid" /usr/sbin/slurmctld; then
      jobs=$(SLURM_CONF=$conf squeue -h -o %i 2>/dev/null | tr '\n' ' ')
      [ -n "${jobs// }" ] && SLURM_CONF=$conf scancel $jobs 2>/dev/null || true
    fi
    if id "hpc_$name" >/dev/null 2>&1 && command -v podman >/dev/null; then
      (cd / && runuser -u "hpc_$name" -- podman stop --all --time 5 >/dev/null 2>&1) || true
    fi
    stop "$F/run/sshd.pid" /usr/sbin/sshd
    stop "$F/run/slurmd.pid" /usr/sbin/slurmd
    stop "$F/run/slurmctld.pid" /usr/sbin/slurmctld
    stop "$F/munge/munged.pid" /usr/sbin/munged
    log "$name: stopped"
  done
}

status() {
  local name F
  for name in $(cat "$BASE/facilities.list" 2>/dev/null || echo "$NAMES"); do
    F=$BASE/fac/$name
    printf '%-10s' "$name"
    for d in "munge/munged.pid munged" "run/slurmctld.pid slurmctld" "run/slurmd.pid slurmd" "run/sshd.pid sshd"; do
      set -- $d
      if alive "$F/$1" "/usr/sbin/$2"; then printf ' %s:up' "$2"; else printf ' %s:down' "$2"; fi
    done
    echo
  done
}

case "${1:-}" in
  install) install_software ;;
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 install|up|down|status" >&2; exit 2 ;;
esac
