#!/usr/bin/env bash
# ab.sh WORKLOAD CLIENTS ROUNDS SERVER...
#
# A/B of server builds: for each round, each SERVER in turn (a `cairn` binary, or `etcd` for
# Debian's etcd) is started fresh on 127.0.0.1:23790 with a temp data dir, given one
# `cairn-bench run --workload WORKLOAD --clients CLIENTS --duration ${DURATION:-5s}`, and
# stopped; one line per run, prefixed with the server's file name. Alternating fresh servers
# is how this repository's commit messages compare two builds (runs here move by 10-30 %).
#
# With PG_ADMIN_URL set (e.g. postgres://postgres@127.0.0.1:5432, a server the caller runs),
# every Cairn run uses `--backend postgres` on a database created for it (and dropped after),
# and the line adds that server's CPU per op (`--store-pid` of its postmaster, from
# postmaster.pid in its data directory: a local server). With TIKV_FAKE set (the path of a
# `cairn-tikv-fake` binary), every Cairn run uses `--backend tikv` on a fresh fake PD + TiKV
# of its own on 127.0.0.1:23810, whose CPU per op the line adds. Needs `etcdctl` (readiness)
# and, for PostgreSQL, `psql`.
set -euo pipefail
[ $# -ge 4 ] || { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
workload=$1 clients=$2 rounds=$3
shift 3
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bench="${BENCH:-$here/target/release/cairn-bench}"
url=http://127.0.0.1:23790
psql_admin() { psql -X -q -tA "$PG_ADMIN_URL/postgres" "$@"; }
n=0
pid=
fake=
trap '[ -z "$pid" ] || kill $pid 2>/dev/null || true; [ -z "$fake" ] || kill $fake 2>/dev/null || true' EXIT
for _ in $(seq "$rounds"); do
    for server in "$@"; do
        n=$((n + 1))
        dir=$(mktemp -d)
        extra=()
        db=
        if [ "$server" = etcd ]; then
            etcd --data-dir "$dir" --listen-client-urls $url --advertise-client-urls $url \
                --listen-peer-urls http://127.0.0.1:23800 >/dev/null 2>&1 &
        else
            if [ -n "${PG_ADMIN_URL:-}" ]; then
                db="ab_$$_$n"
                psql_admin -c "CREATE DATABASE $db"
                extra=(--backend postgres --postgres-url "$PG_ADMIN_URL/$db")
            elif [ -n "${TIKV_FAKE:-}" ]; then
                "$TIKV_FAKE" 127.0.0.1:23810 >/dev/null 2>&1 &
                fake=$!
                for _ in $(seq 100); do
                    (exec 3<>/dev/tcp/127.0.0.1/23810) 2>/dev/null && break
                    sleep 0.1
                done
                extra=(--backend tikv --tikv-pd-endpoints 127.0.0.1:23810)
            fi
            "$server" "${extra[@]}" --data-dir "$dir" --listen-client-urls $url \
                --advertise-client-urls $url >/dev/null 2>&1 &
        fi
        pid=$!
        for _ in $(seq 100); do
            etcdctl --endpoints $url get x >/dev/null 2>&1 && break
            sleep 0.1
        done
        # (a server left over on the port would answer, and be measured, instead)
        kill -0 $pid 2>/dev/null || { echo "ab.sh: $server exited at start (is 127.0.0.1:23790 free?)" >&2; exit 1; }
        store=()
        if [ -n "$db" ]; then
            store=(--store-pid "$(head -1 "$(psql_admin -c 'SHOW data_directory')/postmaster.pid")")
        elif [ -n "$fake" ]; then
            store=(--store-pid $fake)
        fi
        printf '%s ' "$(basename "$server")"
        "$bench" run --endpoints 127.0.0.1:23790 --workload "$workload" --clients "$clients" \
            --duration "${DURATION:-5s}" --server-pid $pid "${store[@]}" 2>&1 | grep -v '^ *workload' | tail -1
        kill $pid
        wait $pid 2>/dev/null || true
        pid=
        if [ -n "$fake" ]; then
            kill $fake
            wait $fake 2>/dev/null || true
            fake=
        fi
        rm -rf "$dir"
        [ -z "$db" ] || psql_admin -c "DROP DATABASE $db"
    done
done
