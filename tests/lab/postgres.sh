#!/usr/bin/env bash
# The test bed's private PostgreSQL: its own cluster under LABDIR/postgres, listening on
# 127.0.0.1 only, on a free port chosen at the first start and kept afterwards, with its
# unix socket in that directory (-k). It never touches the system's clusters
# (pg_ctlcluster, /var/lib/postgresql) and runs as the `postgres` user, since PostgreSQL
# refuses to run as root.
#
#   tests/lab/postgres.sh up          initdb if needed, start (or reuse), create database patchd
#   tests/lab/postgres.sh down        stop (fast) if running; the data stays for the next up
#   tests/lab/postgres.sh status      one line; exit 0 only if it accepts connections
#   tests/lab/postgres.sh stop [MODE] stop it as an outage would: MODE fast (default) or
#                                     immediate (a crash: no checkpoint, recovery at start)
#   tests/lab/postgres.sh start       start it again on the same port
#   tests/lab/postgres.sh env         print LABDIR/postgres/env (the lines lab.env includes)
#
# The cluster trusts local connections (-A trust, superuser `patchd`): a test bed on
# loopback, nothing else can reach it. lab.sh up/down/status call this script; it also
# runs on its own (the store tests start it when it is not up).
#
# Environment: PATCHD_LAB_DIR (default /tmp/patchd-lab), as lab.sh.
set -Eeuo pipefail

PG_START_TIMEOUT=60
PG_USER=patchd
PG_DB=patchd

log() { printf 'lab: postgres: %s\n' "$*" >&2; }
die() {
    local msg=$1 logf=${2:-}
    printf 'postgres.sh: FAILED: %s\n' "$msg" >&2
    if [[ -n $logf && -s $logf ]]; then
        printf -- '--- last 30 lines of %s ---\n' "$logf" >&2
        tail -n 30 "$logf" >&2
        printf -- '--- end of %s ---\n' "$logf" >&2
    fi
    exit 1
}

LAB_DIR=${PATCHD_LAB_DIR:-/tmp/patchd-lab}
[[ $LAB_DIR == /* ]] || LAB_DIR="$PWD/$LAB_DIR"
LAB_DIR=${LAB_DIR%/}
[[ -n $LAB_DIR && $LAB_DIR != / ]] || die "refusing to use / as the lab directory"
PG_DIR=$LAB_DIR/postgres
PG_DATA=$PG_DIR/data
PG_LOG=$PG_DIR/postgres.log
PG_PORT_FILE=$PG_DIR/port
PG_ENV=$PG_DIR/env
# The socket is PG_DIR/.s.PGSQL.PORT: a unix socket path must stay under 108 bytes.
(( ${#PG_DIR} <= 80 )) || die "lab directory path too long for PostgreSQL's socket: $PG_DIR"

# The newest PostgreSQL installed (Debian: /usr/lib/postgresql/VERSION/bin).
pg_bin() {
    local d
    d=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -type d -name bin 2>/dev/null | sort -V | tail -n 1)
    [[ -n $d && -x $d/pg_ctl ]] || die "no PostgreSQL server found under /usr/lib/postgresql (package postgresql)"
    printf '%s' "$d"
}

as_pg() {
    if (( EUID == 0 )); then
        runuser -u postgres -- "$@"
    elif [[ $(id -un) == postgres ]]; then
        "$@"
    else
        die "must run as root (to become the postgres user) or as postgres"
    fi
}

free_port() {
    python3 -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

pg_ready() { "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -d postgres -U "$PG_USER" -t 2; }

running() { [[ -f $PG_DATA/postmaster.pid ]] && as_pg "$BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; }

write_env() {
    local tmp=$PG_ENV.tmp.$$
    {
        printf "export PATCHD_LAB_PG_URL='postgresql://%s@127.0.0.1:%s/%s'\n" "$PG_USER" "$PORT" "$PG_DB"
        printf "export PATCHD_LAB_PG_ADMIN_URL='postgresql://%s@127.0.0.1:%s/postgres'\n" "$PG_USER" "$PORT"
        printf "export PATCHD_LAB_PG_BIN='%s'\n" "$BIN"
        printf "export PATCHD_LAB_PG_DIR='%s'\n" "$PG_DIR"
    } >"$tmp"
    mv -f "$tmp" "$PG_ENV"
}

init_cluster() {
    mkdir -p "$PG_DIR"
    chown postgres:postgres "$PG_DIR" 2>/dev/null || true
    chmod 700 "$PG_DIR"
    as_pg test -x "$PG_DIR" || die "the postgres user cannot enter $PG_DIR (a parent directory is not searchable)"
    [[ -f $PG_DATA/PG_VERSION ]] && return 0
    log "initdb $PG_DATA"
    as_pg "$BIN/initdb" -D "$PG_DATA" -A trust -U "$PG_USER" -E UTF8 --locale=C.UTF-8 \
        >"$PG_DIR/initdb.log" 2>&1 || die "initdb failed" "$PG_DIR/initdb.log"
}

start_server() {
    local t0=$SECONDS
    if [[ -s $PG_PORT_FILE ]]; then
        PORT=$(tr -dc '0-9' <"$PG_PORT_FILE")
    else
        PORT=$(free_port) || die "no free port"
        printf '%s\n' "$PORT" >"$PG_PORT_FILE"
    fi
    if running && pg_ready; then
        log "reusing the server on 127.0.0.1:$PORT"
        write_env
        return 0
    fi
    # fsync stays on (the default): the crash tests need a returned commit to be durable.
    as_pg "$BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t "$PG_START_TIMEOUT" \
        -o "-k $PG_DIR -p $PORT -c listen_addresses=127.0.0.1 -c max_connections=200" \
        start >/dev/null 2>&1 9>&- || die "pg_ctl start on port $PORT failed" "$PG_LOG"
    pg_ready || die "started but does not accept connections on 127.0.0.1:$PORT" "$PG_LOG"
    write_env
    log "up on 127.0.0.1:$PORT in $((SECONDS - t0))s"
}

ensure_db() {
    local have
    have=$(as_pg "$BIN/psql" -h "$PG_DIR" -p "$PORT" -U "$PG_USER" -d postgres -Atqc \
        "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'") || die "psql failed" "$PG_LOG"
    [[ $have == 1 ]] || as_pg "$BIN/createdb" -h "$PG_DIR" -p "$PORT" -U "$PG_USER" "$PG_DB" ||
        die "createdb $PG_DB failed" "$PG_LOG"
}

stop_server() {
    local mode=${1:-fast}
    [[ $mode == fast || $mode == immediate ]] || die "stop mode must be fast or immediate, not $mode"
    if running; then
        as_pg "$BIN/pg_ctl" -D "$PG_DATA" -m "$mode" -w -t 60 stop >/dev/null 2>&1 ||
            die "pg_ctl stop -m $mode failed" "$PG_LOG"
        log "stopped ($mode)"
    fi
}

main() {
    BIN=$(pg_bin)
    PORT=$(tr -dc "0-9" 2>/dev/null <"$PG_PORT_FILE" || true)
    case ${1:-} in
        up) init_cluster; start_server; ensure_db ;;
        start)
            [[ -f $PG_DATA/PG_VERSION ]] || die "no cluster in $PG_DATA: run up first"
            start_server ;;
        stop) stop_server "${2:-fast}" ;;
        down) stop_server fast; rm -f "$PG_ENV" ;;
        status)
            if [[ -n $PORT ]] && running && pg_ready; then
                printf '%-9s up    pid %-8s %s\n' postgres "$(head -n 1 "$PG_DATA/postmaster.pid")" "127.0.0.1:$PORT"
            else
                printf '%-9s down  %-12s %s\n' postgres - "127.0.0.1:${PORT:--}"
                return 1
            fi ;;
        env) [[ -s $PG_ENV ]] || die "$PG_ENV missing: not up"; cat "$PG_ENV" ;;
        *) sed -n '2,/^set -Eeuo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
    esac
}

main "$@"
