#!/usr/bin/env bash
# A PostgreSQL cluster in a folder of its own, with a database and user for an MLflow store:
# bash scripts/postgres-local.sh start|stop|status.
#
# start installs Debian's postgresql with apt-get where it is missing (root needed), makes the cluster in
# $POSTGRES_LOCAL_DIR (run by the `postgres` user when started as root: initdb refuses root), listens on
# 127.0.0.1:$POSTGRES_LOCAL_PORT only, and creates the user and database $POSTGRES_LOCAL_DB (password the same).
# It prints the store's URI last: mlflow server --backend-store-uri <that URI>. stop ends the cluster (pg_ctl).
set -euo pipefail

DIR=${POSTGRES_LOCAL_DIR:-/tmp/runner-postgres}
PORT=${POSTGRES_LOCAL_PORT:-55432}
DB=${POSTGRES_LOCAL_DB:-mlflow}

say() { echo "postgres-local: $*"; }
die() { echo "postgres-local: error: $*" >&2; exit 2; }

bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }

install() {
    [[ -n $(bindir) ]] && return
    [[ $(id -u) == 0 ]] || die "PostgreSQL missing and not root: run as root, or apt-get install postgresql"
    command -v apt-get >/dev/null || die "PostgreSQL missing and no apt-get: install Debian's postgresql"
    say "installing postgresql (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql >"$DIR.apt.log" 2>&1 \
        || die "apt-get failed: see $DIR.apt.log"
}

# The cluster's owner runs its commands: `postgres` when we are root, else ourselves.
owner() { if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
pg() { owner "$(bindir)/$1" "${@:2}"; }
sql() { pg psql -h "$DIR" -p "$PORT" -U postgres -d postgres -tAq -v ON_ERROR_STOP=1 -c "$1"; }

running() { [[ -d $DIR/data ]] && pg pg_ctl -D "$DIR/data" status >/dev/null 2>&1; }

start() {
    install
    mkdir -p "$DIR"
    [[ $(id -u) == 0 ]] && chown postgres: "$DIR"
    [[ -f $DIR/data/PG_VERSION ]] || pg initdb -D "$DIR/data" -U postgres --auth-local=trust \
        --auth-host=scram-sha-256 >"$DIR/initdb.log" 2>&1 || die "initdb failed: see $DIR/initdb.log"
    running || pg pg_ctl -D "$DIR/data" -l "$DIR/postgres.log" -w -t 60 \
        -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1" start >/dev/null \
        || die "PostgreSQL did not start: see $DIR/postgres.log"
    [[ $(sql "select 1 from pg_roles where rolname = '$DB'") == 1 ]] \
        || sql "create role \"$DB\" login password '$DB'"
    [[ $(sql "select 1 from pg_database where datname = '$DB'") == 1 ]] \
        || sql "create database \"$DB\" owner \"$DB\""
    say "running in $DIR"
    echo "postgresql://$DB:$DB@127.0.0.1:$PORT/$DB"
}

stop() {
    running || { say "not running"; return 0; }
    pg pg_ctl -D "$DIR/data" -m fast -w stop >/dev/null
    say "stopped"
}

status() {
    running || { say "not running ($DIR)"; return 3; }
    say "running in $DIR: postgresql://$DB:$DB@127.0.0.1:$PORT/$DB"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start|stop|status (folder: POSTGRES_LOCAL_DIR, default /tmp/runner-postgres)" ;;
esac
