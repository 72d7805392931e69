#!/usr/bin/env bash
# patchd's local test bed: a private Docker engine, a registry and a vSphere API
# simulator (vcsim), all on this machine, each with its own directory, pid file and a
# free port chosen at start.
#
#   tests/lab/lab.sh up       install missing Debian packages, start (or reuse) everything,
#                             Debian machines and their apt repository included (machines.py)
#   tests/lab/lab.sh env      print LABDIR/lab.env:  eval "$(tests/lab/lab.sh env)"
#   tests/lab/lab.sh status   one line per service; exit 0 only if all are up
#   tests/lab/lab.sh down     stop everything by pid file, clean up dockerd's leftovers
#   tests/lab/lab.sh stop SERVICE    stop one service of a lab that is up (docker,
#                                    registry, vcsim or postgres), as an outage would; the
#                                    rest stays (tests/lab/postgres.sh stop immediate: a crash)
#   tests/lab/lab.sh start SERVICE   start it again on the same address (lab.env stays true)
#
# `stop docker` lets dockerd shut down as its service manager would (SIGTERM: the engine
# stops its containers itself, so their restart policies apply when it starts again; no
# live-restore). `start vcsim` gives a simulator with a fresh inventory: vcsim keeps its
# state in memory.
#
# Environment:
#   PATCHD_LAB_DIR     state directory (default /tmp/patchd-lab)
#   PATCHD_LAB_PYTHON  python used for the vcsim login probe (default: the repo's
#                      .venv/bin/python if present, else python3; without pyVmomi the
#                      probe falls back to a SOAP request with curl)
#   PATCHD_LAB_SKIP_APT=1  never run apt-get (fail if a package is missing)
#   PATCHD_LAB_MACHINES, PATCHD_LAB_RPM_MACHINES, PATCHD_LAB_MACHINE_NET, PATCHD_LAB_CACHE:
#                      see tests/lab/machines.py (rpm machines: tests/lab/rpmlab.py)
#                      (PATCHD_LAB_MACHINES=0: no machines)
#
# It never talks to the system Docker engine: dockerd gets its own data-root,
# exec-root, socket, containerd namespace and cgroup parent, all named after the lab
# directory. `down` touches only processes it can prove are this lab's (pid file plus
# command line) and mounts under this lab's data-root and exec-root.
set -Eeuo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)

PACKAGES=(docker.io docker-registry busybox-static golang-go golang-github-vmware-govmomi-dev
          prometheus faketime curl openssl systemd mmdebstrap dpkg-dev openssh-client postgresql)

BASE_IMAGE_RAW=patchd-lab/busybox-base:latest
BASE_IMAGE=patchd-lab/busybox:latest
IMAGE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# A fresh engine answers in a second or two; one whose data-root is reused (a lab brought
# up again) first restores its containers and clears stale network sandboxes, which on a
# busy 2-core machine has taken over 20 s. This is a limit, not a wait.
DOCKERD_TIMEOUT=120
REGISTRY_TIMEOUT=20
VCSIM_TIMEOUT=30
STOP_TIMEOUT=15

STEP=init
log() { printf 'lab: %s\n' "$*" >&2; }
on_err() {
    local rc=$? line=$1
    printf 'lab.sh: FAILED (exit %s) at line %s during step "%s"\n' "$rc" "$line" "$STEP" >&2
}
trap 'on_err $LINENO' ERR

# die PART MESSAGE [LOGFILE]: name the part that failed and show the tail of its log.
die() {
    local part=$1 msg=$2 logf=${3:-}
    trap - ERR
    printf 'lab.sh: %s FAILED: %s\n' "$part" "$msg" >&2
    if [[ -n $logf && -s $logf ]]; then
        printf -- '--- last 40 lines of %s ---\n' "$logf" >&2
        tail -n 40 "$logf" >&2
        printf -- '--- end of %s ---\n' "$logf" >&2
    fi
    exit 1
}

now() { printf '%s' "${EPOCHREALTIME/,/.}"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

# --- paths -------------------------------------------------------------------------

resolve_lab_dir() {
    LAB_DIR=${PATCHD_LAB_DIR:-/tmp/patchd-lab}
    [[ $LAB_DIR == /* ]] || LAB_DIR="$PWD/$LAB_DIR"
    LAB_DIR=${LAB_DIR%/}
    [[ -n $LAB_DIR && $LAB_DIR != / ]] || die setup "refusing to use / as the lab directory"
    LAB_ID=$(printf '%s' "$LAB_DIR" | sha256sum | cut -c1-10)

    DK_DIR=$LAB_DIR/docker
    DK_DATA=$DK_DIR/data
    DK_LOG=$DK_DIR/dockerd.log
    DK_PID=$DK_DIR/dockerd.pid
    DK_CLI_CONFIG=$DK_DIR/cli-config
    DK_BUILD=$DK_DIR/build
    # containerd puts sockets under the exec-root (…/containerd/containerd.sock.ttrpc):
    # unix socket paths must stay under 108 bytes, so a long lab dir gets a short
    # run dir in /tmp named after it.
    if (( ${#LAB_DIR} <= 60 )); then
        DK_RUN=$LAB_DIR/run
    else
        DK_RUN=/tmp/pdl-$LAB_ID
    fi
    DK_EXEC=$DK_RUN/x
    DK_SOCK=$DK_RUN/d.sock
    DK_HOST=unix://$DK_SOCK
    DK_NAMESPACE=patchd-lab-$LAB_ID
    DK_CGROUP=patchd-lab-$LAB_ID

    REG_DIR=$LAB_DIR/registry
    REG_CONF=$REG_DIR/config.yml
    REG_LOG=$REG_DIR/registry.log
    REG_PID=$REG_DIR/registry.pid
    REG_ADDR=$REG_DIR/addr

    VC_DIR=$LAB_DIR/vcsim
    VC_SRC=$SCRIPT_DIR/vcsim/main.go
    VC_BIN=$VC_DIR/vcsim
    VC_LOG=$VC_DIR/vcsim.log
    VC_OUT=$VC_DIR/vcsim.out
    VC_PID=$VC_DIR/vcsim.pid
    VC_ADDR=$VC_DIR/addr
    VC_BUILD_LOG=$VC_DIR/build.log

    ENV_FILE=$LAB_DIR/lab.env
}

docker_cli() {
    local bin=/usr/bin/docker   # the docker.io client, same version as dockerd
    [[ -x $bin ]] || bin=$(command -v docker) || die docker "no docker client found"
    DOCKER_BUILDKIT=0 DOCKER_CONFIG=$DK_CLI_CONFIG DOCKER_CLI_HINTS=false \
        env -u DOCKER_HOST -u DOCKER_CONTEXT -u DOCKER_TLS_VERIFY -u DOCKER_CERT_PATH \
        "$bin" -H "$DK_HOST" "$@"
}

pick_python() {
    if [[ -n ${PATCHD_LAB_PYTHON:-} ]]; then
        LAB_PYTHON=$PATCHD_LAB_PYTHON
    elif [[ -x $REPO_ROOT/.venv/bin/python ]]; then
        LAB_PYTHON=$REPO_ROOT/.venv/bin/python
    else
        LAB_PYTHON=$(command -v python3 || true)
    fi
}

# --- processes ---------------------------------------------------------------------

# pid_alive PID: running and not a zombie (pid 1 may be slow to reap orphans).
pid_alive() {
    local pid=$1 stat
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != [ZX] ]]
}

# pid_has_arg PID ARG: ARG is one of the process's exact command-line arguments.
pid_has_arg() {
    # No grep -q: with pipefail an early exit of grep could fail the pipeline (SIGPIPE).
    [[ -r /proc/$1/cmdline ]] && tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null | grep -xF -- "$2" >/dev/null
}

read_pid() { [[ -s $1 ]] && tr -dc '0-9' <"$1"; }

# our_pid PIDFILE ARG: print the pid if it is alive and its command line holds ARG.
our_pid() {
    local pid
    pid=$(read_pid "$1") || return 1
    [[ -n $pid ]] && pid_alive "$pid" && pid_has_arg "$pid" "$2" && printf '%s' "$pid"
}

# stop_pid NAME PID: SIGTERM, wait up to STOP_TIMEOUT, then SIGKILL.
stop_pid() {
    local name=$1 pid=$2 deadline=$((SECONDS + STOP_TIMEOUT))
    pid_alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    while pid_alive "$pid"; do
        if (( SECONDS >= deadline )); then
            log "$name (pid $pid) ignored SIGTERM for ${STOP_TIMEOUT}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            local d2=$((SECONDS + 5))
            while pid_alive "$pid" && (( SECONDS < d2 )); do sleep 0.1; done
            pid_alive "$pid" && log "WARNING: $name (pid $pid) survived SIGKILL"
            return 0
        fi
        sleep 0.1
    done
}

free_port() {
    local py p
    py=${LAB_PYTHON:-}
    [[ -n $py ]] || py=$(command -v python3 || true)
    if [[ -n $py ]]; then
        "$py" -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()' && return 0
    fi
    # No python: random high ports until one refuses a connection.
    for _ in $(seq 200); do
        p=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            printf '%s\n' "$p"
            return 0
        fi
    done
    return 1
}

# wait_for TIMEOUT PID CMD...: poll CMD every 0.1 s. 0 = ready, 1 = timeout, 2 = PID died.
wait_for() {
    local timeout=$1 pid=$2 deadline
    shift 2
    deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        pid_alive "$pid" || return 2
        (( SECONDS < deadline )) || return 1
        sleep 0.1
    done
}

# --- packages ----------------------------------------------------------------------

ensure_packages() {
    STEP=packages
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        if [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true) != "install ok installed" ]]; then
            missing+=("$p")
        fi
    done
    (( ${#missing[@]} == 0 )) && return 0
    [[ ${PATCHD_LAB_SKIP_APT:-0} == 1 ]] &&
        die packages "missing Debian packages (PATCHD_LAB_SKIP_APT=1): ${missing[*]}"
    local sudo=()
    if (( EUID != 0 )); then
        command -v sudo >/dev/null || die packages "missing ${missing[*]} and not root (no sudo)"
        sudo=(sudo -n)
    fi
    local t0 aptlog=$LAB_DIR/apt.log
    t0=$(now)
    log "installing missing Debian packages: ${missing[*]}"
    "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=300 update >"$aptlog" 2>&1 || die packages "apt-get update failed" "$aptlog"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y "${PACKAGES[@]}" >>"$aptlog" 2>&1 ||
        die packages "apt-get install ${PACKAGES[*]} failed" "$aptlog"
    log "packages installed in $(since "$t0")"
}

# --- dockerd -----------------------------------------------------------------------

docker_ping() { [[ $(curl -sf --max-time 2 --unix-socket "$DK_SOCK" http://d/_ping) == OK ]]; }

start_dockerd() {
    STEP=dockerd
    local pid t0 rc=0
    t0=$(now)
    if pid=$(our_pid "$DK_PID" "$DK_DATA") && docker_ping; then
        log "dockerd: reusing pid $pid on $DK_HOST"
        return 0
    fi
    if [[ -n ${pid:-} ]]; then
        log "dockerd: pid $pid does not answer; restarting it"
    fi
    stop_dockerd quiet
    mkdir -p "$DK_DATA" "$DK_EXEC" "$DK_CLI_CONFIG"
    rm -f "$DK_SOCK" "$DK_PID"
    printf '=== %s: starting dockerd\n' "$(date -Is)" >>"$DK_LOG"
    command -v dockerd >/dev/null || die dockerd "dockerd not found (package docker.io)"
    setsid dockerd \
        --data-root "$DK_DATA" --exec-root "$DK_EXEC" -H "$DK_HOST" --pidfile "$DK_PID" \
        --iptables=false --ip6tables=false --bridge=none --storage-driver=vfs \
        --containerd-namespace "$DK_NAMESPACE" \
        --containerd-plugins-namespace "$DK_NAMESPACE-plugins" \
        --cgroup-parent "/$DK_CGROUP" \
        --shutdown-timeout 5 \
        </dev/null >>"$DK_LOG" 2>&1 9>&- &
    pid=$!
    wait_for "$DOCKERD_TIMEOUT" "$pid" docker_ping || rc=$?
    case $rc in
        0) ;;
        1) stop_pid dockerd "$pid"
           die dockerd "no answer on $DK_SOCK/_ping after ${DOCKERD_TIMEOUT}s (stopped it)" "$DK_LOG" ;;
        *) die dockerd "dockerd (pid $pid) exited during start" "$DK_LOG" ;;
    esac
    log "dockerd: pid $pid ready on $DK_HOST in $(since "$t0")"
}

# stop_dockerd [quiet] [engine]: stop our dockerd and whatever it left behind. With
# `engine`, dockerd stops its containers itself (an outage, not a teardown).
stop_dockerd() {
    local pid cpid p ids
    if pid=$(our_pid "$DK_PID" "$DK_DATA"); then
        # Kill running containers first: a dockerd shutdown otherwise waits each
        # container's stop timeout (a shell loop as PID 1 ignores SIGTERM).
        if [[ ${2:-} != engine ]] && docker_ping; then
            ids=$(docker_cli ps -q 2>/dev/null || true)
            if [[ -n $ids ]]; then
                # shellcheck disable=SC2086
                docker_cli kill $ids >/dev/null 2>&1 || true
            fi
        fi
        stop_pid dockerd "$pid"
        [[ ${1:-} == quiet ]] || log "dockerd: stopped pid $pid"
    fi
    # dockerd's own containerd, if it outlived dockerd (dockerd was SIGKILLed).
    if cpid=$(our_pid "$DK_EXEC/containerd/containerd.pid" "$DK_EXEC/containerd/containerd.toml"); then
        stop_pid containerd "$cpid"
    fi
    # Container processes in our cgroup parent, then shims of our containerd.
    kill_cgroup_procs
    local comm
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        { read -r comm <"/proc/$p/comm"; } 2>/dev/null || continue
        [[ $comm == containerd-shim* ]] || continue
        if pid_has_arg "$p" "$DK_EXEC/containerd/containerd.sock" && pid_has_arg "$p" "$DK_NAMESPACE"; then
            log "killing leftover containerd shim pid $p"
            kill -KILL "$p" 2>/dev/null || true
        fi
    done
    unmount_under "$DK_EXEC" "$DK_DATA"
    remove_cgroups
    # The exec-root holds only runtime state; clear it unless something is still mounted.
    if { [[ -z ${pid:-} ]] || ! pid_alive "$pid"; } &&
        ! awk '{ print $5 }' /proc/self/mountinfo | grep -F -- "$DK_RUN/" >/dev/null; then
        rm -rf --one-file-system "$DK_EXEC"
    fi
}

cgroup_dirs() {
    local d
    for d in /sys/fs/cgroup/"$DK_CGROUP" /sys/fs/cgroup/*/"$DK_CGROUP"; do
        [[ -d $d ]] && printf '%s\n' "$d"
    done
    return 0
}

kill_cgroup_procs() {
    local d f p
    while read -r d; do
        while read -r f; do
            while read -r p; do
                if [[ -n $p ]]; then
                    log "killing leftover container process $p (cgroup $DK_CGROUP)"
                    kill -KILL "$p" 2>/dev/null || true
                fi
            done <"$f"
        done < <(find "$d" -name cgroup.procs 2>/dev/null)
    done < <(cgroup_dirs)
}

remove_cgroups() {
    local d
    while read -r d; do
        find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
    done < <(cgroup_dirs)
}

# unmount_under DIR...: unmount every mount point under the given directories, deepest first.
unmount_under() {
    local mp d found=()
    while read -r mp; do
        mp=$(printf '%b' "$mp") # mountinfo escapes spaces etc. as \040
        for d in "$@"; do
            if [[ $mp == "$d" || $mp == "$d"/* ]]; then
                found+=("$mp")
            fi
        done
    done < <(awk '{ print $5 }' /proc/self/mountinfo)
    (( ${#found[@]} )) || return 0
    while read -r mp; do
        log "unmounting leftover $mp"
        umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || log "WARNING: could not unmount $mp"
    done < <(printf '%s\n' "${found[@]}" | awk '{ print length($0) "\t" $0 }' | sort -rn | cut -f2-)
}

# --- base images -------------------------------------------------------------------

build_images() {
    STEP=images
    local t0 blog=$DK_DIR/build.log rootfs ctx
    t0=$(now)
    if docker_cli image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "images: $BASE_IMAGE already present"
        return 0
    fi
    : >"$blog"
    if ! docker_cli image inspect "$BASE_IMAGE_RAW" >/dev/null 2>&1; then
        [[ -x /bin/busybox ]] || die images "/bin/busybox missing (package busybox-static)"
        rootfs=$DK_BUILD/rootfs
        rm -rf "$rootfs"
        mkdir -p "$rootfs/bin"
        cp /bin/busybox "$rootfs/bin/busybox"
        local applet
        for applet in sh ls cat echo mkdir rm sleep; do
            ln -s busybox "$rootfs/bin/$applet"
        done
        tar -C "$rootfs" --numeric-owner --owner=0 --group=0 -cf "$DK_BUILD/base.tar" . ||
            die images "could not pack the busybox tarball"
        docker_cli import --change "ENV PATH=$IMAGE_PATH" --change 'CMD ["/bin/sh"]' \
            "$DK_BUILD/base.tar" "$BASE_IMAGE_RAW" >>"$blog" 2>&1 ||
            die images "docker import of $BASE_IMAGE_RAW failed" "$blog"
    fi
    ctx=$DK_BUILD/ctx
    rm -rf "$ctx"
    mkdir -p "$ctx"
    # One RUN step and no metadata steps (ENV and CMD come from the import): the legacy
    # builder commits a full vfs copy per step; 2 RUNs + ENV + CMD took 5 s, this 2 s.
    # (/bin/sh is one of the imported symlinks.) No LABEL: containers would inherit it.
    cat >"$ctx/Dockerfile" <<EOF
FROM $BASE_IMAGE_RAW
RUN /bin/busybox --install -s /bin \\
 && mkdir -p /tmp /var/tmp /root /home /etc /usr/bin /usr/sbin /sbin \\
 && chmod 1777 /tmp /var/tmp \\
 && printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >/etc/passwd \\
 && printf 'root:x:0:\nnogroup:x:65534:\n' >/etc/group
EOF
    docker_cli build --network none -t "$BASE_IMAGE" "$ctx" >>"$blog" 2>&1 ||
        die images "docker build of $BASE_IMAGE failed" "$blog"
    log "images: built $BASE_IMAGE in $(since "$t0")"
}

# --- registry ----------------------------------------------------------------------

registry_ping() { curl -sf --max-time 2 "http://$1/v2/" >/dev/null; }

start_registry() {
    STEP=registry
    local pid addr port t0 rc
    t0=$(now)
    if pid=$(our_pid "$REG_PID" "$REG_CONF") && addr=$(cat "$REG_ADDR" 2>/dev/null) && registry_ping "$addr"; then
        log "registry: reusing pid $pid on $addr"
        REGISTRY=$addr
        return 0
    fi
    stop_service registry "$REG_PID" "$REG_CONF"
    command -v docker-registry >/dev/null || die registry "docker-registry not found (package docker-registry)"
    mkdir -p "$REG_DIR/data"
    for _ in 1 2 3; do
        if [[ -n ${SAME_PORT:-} ]]; then
            port=${SAME_PORT##*:}
        else
            port=$(free_port) || die registry "no free port found"
        fi
        addr=127.0.0.1:$port
        cat >"$REG_CONF" <<EOF
# patchd lab registry (written by tests/lab/lab.sh): no auth, plain HTTP on loopback.
version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $REG_DIR/data
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: $addr
  secret: patchd-lab-$LAB_ID
EOF
        rm -f "$REG_ADDR"
        printf '=== %s: starting docker-registry on %s\n' "$(date -Is)" "$addr" >>"$REG_LOG"
        setsid docker-registry serve "$REG_CONF" </dev/null >>"$REG_LOG" 2>&1 9>&- &
        pid=$!
        printf '%s\n' "$pid" >"$REG_PID"
        rc=0
        wait_for "$REGISTRY_TIMEOUT" "$pid" registry_ping "$addr" || rc=$?
        if (( rc == 0 )); then
            printf '%s\n' "$addr" >"$REG_ADDR"
            REGISTRY=$addr
            log "registry: pid $pid ready on $addr in $(since "$t0")"
            return 0
        fi
        if (( rc == 2 )) && tail -n 5 "$REG_LOG" | grep 'address already in use' >/dev/null; then
            [[ -z ${SAME_PORT:-} ]] || die registry "its port $port is taken now" "$REG_LOG"
            log "registry: port $port was taken meanwhile; trying another"
            continue
        fi
        stop_pid registry "$pid"
        if (( rc == 1 )); then
            die registry "no answer on http://$addr/v2/ after ${REGISTRY_TIMEOUT}s" "$REG_LOG"
        fi
        die registry "docker-registry (pid $pid) exited during start" "$REG_LOG"
    done
    die registry "could not bind a free port in 3 attempts" "$REG_LOG"
}

# stop_service NAME PIDFILE ARG
stop_service() {
    local pid
    if pid=$(our_pid "$2" "$3"); then
        stop_pid "$1" "$pid"
        [[ ${4:-} == quiet ]] || log "$1: stopped pid $pid"
    fi
    rm -f "$2"
}

# --- vcsim -------------------------------------------------------------------------

build_vcsim() {
    STEP=vcsim-build
    local t0 tmp
    [[ -f $VC_SRC ]] || die vcsim "source $VC_SRC missing"
    if [[ -x $VC_BIN && ! $VC_SRC -nt $VC_BIN ]]; then
        return 0
    fi
    t0=$(now)
    mkdir -p "$VC_DIR"
    command -v go >/dev/null || die vcsim "go not found (package golang-go)"
    [[ -d /usr/share/gocode/src/github.com/vmware/govmomi/simulator ]] ||
        die vcsim "govmomi simulator source missing (package golang-github-vmware-govmomi-dev)"
    if [[ -z ${GOCACHE:-} && -z ${HOME:-} && -z ${XDG_CACHE_HOME:-} ]]; then
        export GOCACHE=$LAB_DIR/go-cache
    fi
    tmp=$VC_BIN.tmp.$$
    log "vcsim: building $VC_BIN (first build of govmomi takes ~40 s, then ~5 s)"
    (cd "$(dirname "$VC_SRC")" &&
        env GO111MODULE=off GOPATH=/usr/share/gocode GOFLAGS= CGO_ENABLED=0 \
            go build -buildvcs=false -o "$tmp" "$(basename "$VC_SRC")") >"$VC_BUILD_LOG" 2>&1 ||
        { rm -f "$tmp"; die vcsim "go build of $VC_SRC failed" "$VC_BUILD_LOG"; }
    mv -f "$tmp" "$VC_BIN"
    log "vcsim: built in $(since "$t0")"
}

soap_probe() {
    local out
    out=$(curl -sf --max-time 3 -X POST -H 'Content-Type: text/xml; charset=utf-8' \
        -H 'SOAPAction: urn:vim25/6.5' --data-binary @- "http://$1/sdk" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:vim25="urn:vim25"><soapenv:Body><vim25:RetrieveServiceContent><vim25:_this type="ServiceInstance">ServiceInstance</vim25:_this></vim25:RetrieveServiceContent></soapenv:Body></soapenv:Envelope>
EOF
    ) || return 1
    [[ $out == *RetrieveServiceContentResponse* ]]
}

# pyvmomi_login HOST PORT: 0 = login worked, 1 = failed, 3 = no pyVmomi in LAB_PYTHON.
pyvmomi_login() {
    [[ -n ${LAB_PYTHON:-} ]] || return 3
    "$LAB_PYTHON" - "$1" "$2" <<'EOF'
import sys
try:
    from pyVim.connect import Disconnect, SmartConnect
except ImportError:
    sys.exit(3)
try:
    si = SmartConnect(host=sys.argv[1], port=int(sys.argv[2]), user="user", pwd="pass",
                      protocol="http", connectionPoolTimeout=5)
    assert si.content.about.apiType == "VirtualCenter", si.content.about.apiType
    Disconnect(si)
except Exception as e:
    print(f"pyvmomi login failed: {e!r}", file=sys.stderr)
    sys.exit(1)
EOF
}

# vcsim_exe_current PID: the process runs the current binary (not one replaced by a rebuild).
vcsim_exe_current() { [[ $(readlink "/proc/$1/exe" 2>/dev/null) == "$VC_BIN" ]]; }

start_vcsim() {
    STEP=vcsim
    local pid addr port t0 rc
    t0=$(now)
    if pid=$(our_pid "$VC_PID" "$VC_BIN") && addr=$(cat "$VC_ADDR" 2>/dev/null) &&
        vcsim_exe_current "$pid" && soap_probe "$addr"; then
        log "vcsim: reusing pid $pid on $addr"
        VCSIM_ADDR=$addr
        return 0
    fi
    stop_service vcsim "$VC_PID" "$VC_BIN" quiet
    mkdir -p "$VC_DIR/tmp"
    for _ in 1 2 3; do
        if [[ -n ${SAME_PORT:-} ]]; then
            port=${SAME_PORT##*:}
        else
            port=$(free_port) || die vcsim "no free port found"
        fi
        addr=127.0.0.1:$port
        rm -f "$VC_ADDR" "$VC_OUT"
        printf '=== %s: starting vcsim on %s\n' "$(date -Is)" "$addr" >>"$VC_LOG"
        # TMPDIR: the model's datastore directories go there (removed on SIGTERM).
        TMPDIR=$VC_DIR/tmp setsid "$VC_BIN" -listen "$addr" </dev/null >"$VC_OUT" 2>>"$VC_LOG" 9>&- &
        pid=$!
        printf '%s\n' "$pid" >"$VC_PID"
        rc=0
        wait_for "$VCSIM_TIMEOUT" "$pid" soap_probe "$addr" || rc=$?
        if (( rc == 2 )) && tail -n 20 "$VC_LOG" | grep 'address already in use' >/dev/null; then
            [[ -z ${SAME_PORT:-} ]] || die vcsim "its port $port is taken now" "$VC_LOG"
            log "vcsim: port $port was taken meanwhile; trying another"
            continue
        fi
        if (( rc != 0 )); then
            stop_pid vcsim "$pid"
            (( rc == 1 )) && die vcsim "no SOAP answer on http://$addr/sdk after ${VCSIM_TIMEOUT}s" "$VC_LOG"
            die vcsim "vcsim (pid $pid) exited during start" "$VC_LOG"
        fi
        rc=0
        pyvmomi_login 127.0.0.1 "$port" 2>>"$VC_LOG" || rc=$?
        case $rc in
            0) log "vcsim: pyvmomi login ok" ;;
            3) log "vcsim: no pyVmomi in ${LAB_PYTHON:-<no python>}; SOAP probe only" ;;
            *) stop_pid vcsim "$pid"
               die vcsim "SOAP answers but a pyvmomi login on $addr failed" "$VC_LOG" ;;
        esac
        printf '%s\n' "$addr" >"$VC_ADDR"
        VCSIM_ADDR=$addr
        log "vcsim: pid $pid ready on http://$addr/sdk in $(since "$t0")"
        return 0
    done
    die vcsim "could not bind a free port in 3 attempts" "$VC_LOG"
}

# --- Debian machines (tests/lab/machines.py) --------------------------------------

# They boot on an engine of their own, in the background while the rest starts.
start_machines() {
    MACHINES_LOG=$LAB_DIR/machines.log
    python3 "$SCRIPT_DIR/machines.py" up "$LAB_DIR" </dev/null >"$MACHINES_LOG" 2>&1 9>&- &
    MACHINES_PID=$!
}

wait_machines() {
    STEP=machines
    wait "$MACHINES_PID" || die machines "tests/lab/machines.py up failed" "$MACHINES_LOG"
    cat "$MACHINES_LOG" >&2
}

# --- commands ----------------------------------------------------------------------

lock_lab() {
    # Services started below get `9>&-`: none of them may inherit (and so hold) the lock.
    exec 9>"$LAB_DIR/.lock"
    if ! flock -n 9; then
        log "waiting for another lab.sh holding $LAB_DIR/.lock (up to 300 s)"
        flock -w 300 9 || die setup "another lab.sh still holds $LAB_DIR/.lock after 300 s"
    fi
}

write_env() {
    STEP="env"
    local tmp=$ENV_FILE.tmp.$$
    {
        printf '# patchd test bed, written by tests/lab/lab.sh up on %s\n' "$(date -Is)"
        printf "export PATCHD_LAB_DIR='%s'\n" "$LAB_DIR"
        printf "export PATCHD_LAB_DOCKER_HOST='%s'\n" "$DK_HOST"
        printf "export PATCHD_LAB_REGISTRY='%s'\n" "$REGISTRY"
        printf "export PATCHD_LAB_VCSIM_URL='%s'\n" "http://$VCSIM_ADDR/sdk"
        printf "export PATCHD_LAB_VCSIM_HOST='%s'\n" "${VCSIM_ADDR%:*}"
        printf "export PATCHD_LAB_VCSIM_PORT='%s'\n" "${VCSIM_ADDR##*:}"
        printf "export PATCHD_LAB_VCSIM_USER='user'\n"
        printf "export PATCHD_LAB_VCSIM_PASSWORD='pass'\n"
        printf "export PATCHD_LAB_VCSIM_BIN='%s'\n" "$VC_BIN"
        printf "export PATCHD_LAB_BASE_IMAGE='%s'\n" "$BASE_IMAGE"
        if [[ -s $LAB_DIR/machines/env ]]; then cat "$LAB_DIR/machines/env"; fi
        "$SCRIPT_DIR/postgres.sh" env
    } >"$tmp"
    mv -f "$tmp" "$ENV_FILE"
}

cmd_up() {
    local t0
    t0=$(now)
    mkdir -p "$LAB_DIR" || die setup "cannot create $LAB_DIR"
    lock_lab
    pick_python
    ensure_packages
    mkdir -p "$DK_DIR" "$REG_DIR" "$VC_DIR"
    start_machines
    start_dockerd
    start_registry
    build_vcsim
    start_vcsim
    build_images
    wait_machines
    STEP=postgres
    "$SCRIPT_DIR/postgres.sh" up 9>&-
    write_env
    STEP="finished"
    log "up in $(since "$t0"); env: $ENV_FILE  (eval \"\$($0 env)\")"
}

cmd_down() {
    [[ -d $LAB_DIR ]] || { log "nothing to stop: $LAB_DIR does not exist"; return 0; }
    lock_lab
    STEP=down
    rm -f "$ENV_FILE"
    stop_service vcsim "$VC_PID" "$VC_BIN"
    stop_service registry "$REG_PID" "$REG_CONF"
    "$SCRIPT_DIR/postgres.sh" down || true
    stop_dockerd
    python3 "$SCRIPT_DIR/machines.py" down "$LAB_DIR" 9>&- || log "WARNING: machines.py down failed"
    rm -f "$DK_SOCK"
    [[ $DK_RUN == "$LAB_DIR"/* ]] || rmdir "$DK_RUN" 2>/dev/null || true
    log "down"
}

# cmd_service start|stop SERVICE: one service of a lab that is up, on its old address.
cmd_service() {
    local action=$1 service=$2
    [[ -s $ENV_FILE ]] || die "$service" "$ENV_FILE missing: the lab is not up (run $0 up)"
    lock_lab
    pick_python
    STEP="$action $service"
    case $action:$service in
        stop:docker) stop_dockerd "" engine ;;
        stop:registry) stop_service registry "$REG_PID" "$REG_CONF" ;;
        stop:vcsim) stop_service vcsim "$VC_PID" "$VC_BIN" ;;
        stop:postgres|start:postgres) "$SCRIPT_DIR/postgres.sh" "$action" 9>&- ;;
        start:docker)
            start_dockerd ;;
        start:registry)
            SAME_PORT=$(cat "$REG_ADDR" 2>/dev/null) || die registry "$REG_ADDR missing"
            start_registry ;;
        start:vcsim)
            SAME_PORT=$(cat "$VC_ADDR" 2>/dev/null) || die vcsim "$VC_ADDR missing"
            build_vcsim
            start_vcsim ;;
        *) usage ;;
    esac
}

cmd_env() {
    [[ -s $ENV_FILE ]] || die env "$ENV_FILE missing: the lab is not up (run $0 up)"
    cat "$ENV_FILE"
}

cmd_status() {
    local pid addr all=0
    if pid=$(our_pid "$DK_PID" "$DK_DATA") && docker_ping; then
        printf '%-9s up    pid %-8s %s\n' dockerd "$pid" "$DK_HOST"
    else
        printf '%-9s down  %-12s %s\n' dockerd - "$DK_HOST"; all=1
    fi
    addr=$(cat "$REG_ADDR" 2>/dev/null || echo -)
    if pid=$(our_pid "$REG_PID" "$REG_CONF") && registry_ping "$addr"; then
        printf '%-9s up    pid %-8s %s\n' registry "$pid" "$addr"
    else
        printf '%-9s down  %-12s %s\n' registry - "$addr"; all=1
    fi
    addr=$(cat "$VC_ADDR" 2>/dev/null || echo -)
    if pid=$(our_pid "$VC_PID" "$VC_BIN") && soap_probe "$addr"; then
        printf '%-9s up    pid %-8s %s\n' vcsim "$pid" "http://$addr/sdk"
    else
        printf '%-9s down  %-12s %s\n' vcsim - "http://$addr/sdk"; all=1
    fi
    python3 "$SCRIPT_DIR/machines.py" status "$LAB_DIR" || all=1
    "$SCRIPT_DIR/postgres.sh" status || all=1
    return "$all"
}

usage() {
    sed -n '2,/^set -Eeuo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

main() {
    if (( $# == 2 )) && [[ $1 == start || $1 == stop ]]; then
        resolve_lab_dir
        cmd_service "$1" "$2"
        return
    fi
    (( $# == 1 )) || usage
    resolve_lab_dir
    case $1 in
        up) cmd_up ;;
        down) cmd_down ;;
        env) cmd_env ;;
        status) cmd_status || exit "$?" ;;
        -h|--help|help) usage ;;
        *) usage ;;
    esac
}

main "$@"
