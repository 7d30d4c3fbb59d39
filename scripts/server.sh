#!/usr/bin/env bash
# A local PostgreSQL (databases `optuna` and `mlflow`) and an MLflow server on top of it: the shared
# stores that many workers need. make server / make server-stop, or scripts/server.sh start|stop|status.
#
# Everything lives in .server/ (data, artifacts, logs, pid). Both listen on 127.0.0.1 only and
# PostgreSQL trusts local connections: fine for one machine. For workers on other machines, set
# listen_addresses and a password in .server/pg (postgresql.conf, pg_hba.conf) and start mlflow
# with --host 0.0.0.0 --allowed-hosts <name>.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_PORT=${SWEEP_PG_PORT:-5433}          # not 5432, to stay clear of a system PostgreSQL
MLFLOW_PORT=${SWEEP_MLFLOW_PORT:-5000}
PG_USER=sweep                           # the superuser initdb creates (trust auth: no password)
RUN_AS=postgres                         # PostgreSQL refuses to run as root; as root, run it as this
STATE=$PWD/.server
PGDATA=$STATE/pg
MLFLOW=${VENV:-.venv}/bin/mlflow
PG_URL=postgresql://$PG_USER@127.0.0.1:$PG_PORT

# Debian keeps the server binaries off PATH, in /usr/lib/postgresql/<version>/bin.
pg_bindir() {
    if command -v pg_ctl >/dev/null; then dirname "$(readlink -f "$(command -v pg_ctl)")"; return; fi
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [[ -x $dir/pg_ctl ]] || { echo "PostgreSQL not found: apt-get install postgresql" >&2; exit 1; }
    echo "$dir"
}
PG_BIN=$(pg_bindir)

as_server_user() {  # run a server command as the unprivileged user when we are root
    if [[ $EUID -eq 0 ]]; then runuser -u "$RUN_AS" -- "$@"; else "$@"; fi
}

mlflow_running() { [[ -f $STATE/mlflow.pid ]] && kill -0 "$(cat "$STATE/mlflow.pid")" 2>/dev/null; }

start_postgres() {
    mkdir -p "$PGDATA"
    touch "$STATE/postgres.log"  # the server user writes it, and may not create files in .server/
    [[ $EUID -eq 0 ]] && chown "$RUN_AS" "$PGDATA" "$STATE/postgres.log"
    if [[ ! -f $PGDATA/PG_VERSION ]]; then
        as_server_user "$PG_BIN/initdb" -D "$PGDATA" -U "$PG_USER" -A trust -E UTF8 --no-locale \
            --no-instructions >"$STATE/initdb.log"
        # TCP only: no unix socket, whose path inside a deep checkout can pass the 107-byte limit.
        echo "unix_socket_directories = ''" >>"$PGDATA/postgresql.conf"
    fi
    if as_server_user "$PG_BIN/pg_ctl" -D "$PGDATA" status >/dev/null; then
        echo "PostgreSQL already running"
    else
        as_server_user "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$STATE/postgres.log" -w -t 60 \
            -o "-h 127.0.0.1 -p $PG_PORT" start >/dev/null
        echo "PostgreSQL on 127.0.0.1:$PG_PORT (log .server/postgres.log)"
    fi
    for db in optuna mlflow; do
        exists=$("$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc \
            "SELECT 1 FROM pg_database WHERE datname = '$db'")
        [[ $exists == 1 ]] || "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" "$db"
    done
}

start_mlflow() {
    if mlflow_running; then echo "MLflow already running"; return; fi
    [[ -x $MLFLOW ]] || { echo "$MLFLOW not found: run make install first" >&2; exit 1; }
    mkdir -p "$STATE/artifacts"
    # setsid: its own process group (pgid = the pid we record), so stop ends its workers too.
    setsid "$MLFLOW" server --host 127.0.0.1 --port "$MLFLOW_PORT" \
        --backend-store-uri "postgresql+psycopg2://$PG_USER@127.0.0.1:$PG_PORT/mlflow" \
        --serve-artifacts --artifacts-destination "$STATE/artifacts" \
        >"$STATE/mlflow.log" 2>&1 </dev/null &
    echo $! >"$STATE/mlflow.pid"
    # The first start creates MLflow's tables: allow a minute.
    for _ in $(seq 120); do
        if curl -fsS "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null 2>&1; then
            echo "MLflow on http://127.0.0.1:$MLFLOW_PORT (log .server/mlflow.log)"
            return
        fi
        mlflow_running || break
        sleep 0.5
    done
    echo "MLflow did not come up; the end of .server/mlflow.log:" >&2
    tail -n 20 "$STATE/mlflow.log" >&2
    stop_mlflow
    exit 1
}

stop_mlflow() {
    if ! mlflow_running; then rm -f "$STATE/mlflow.pid"; return; fi
    local pid
    pid=$(cat "$STATE/mlflow.pid")
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pid" 2>/dev/null || true  # whatever ignored TERM for 10 s
    rm -f "$STATE/mlflow.pid"
    echo "MLflow stopped"
}

stop_postgres() {
    [[ -f $PGDATA/PG_VERSION ]] || return 0
    if as_server_user "$PG_BIN/pg_ctl" -D "$PGDATA" status >/dev/null; then
        as_server_user "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
        echo "PostgreSQL stopped"
    fi
}

case ${1:-} in
    start)
        start_postgres
        start_mlflow
        echo
        echo "Use them from any shell on this machine:"
        echo "  export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"
        echo "  study.storage=$PG_URL/optuna"
        ;;
    stop)
        stop_mlflow  # first: it is PostgreSQL's client
        stop_postgres
        ;;
    status)
        if [[ -f $PGDATA/PG_VERSION ]] && as_server_user "$PG_BIN/pg_ctl" -D "$PGDATA" status \
            >/dev/null; then echo "PostgreSQL: running"; else echo "PostgreSQL: stopped"; fi
        if mlflow_running; then echo "MLflow: running (pid $(cat "$STATE/mlflow.pid"))"
        else echo "MLflow: stopped"; fi
        ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
