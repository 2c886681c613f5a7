#!/usr/bin/env bash
# allocs-per-op.sh CAIRN WORKLOAD CLIENTS
#
# Heap allocations (malloc, realloc and calloc calls: jemalloc's entry points in the binary,
# or glibc's for a binary without them) per operation of a fresh Cairn (native backend, temp
# data dir, 127.0.0.1:23790) under `cairn-bench run`: uprobes count the calls for 4 s in the
# middle of an 8 s run, and the server's revision before and
# after that window counts the writes (so: write workloads only). Needs root (perf probe) and
# `etcdctl`. Allocation counts do not move with the machine's speed the way throughput does.
set -euo pipefail
bin=$1 workload=$2 clients=$3
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bench="$here/target/release/cairn-bench"
# The `cairn` binary allocates with jemalloc (tikv-jemallocator: `_rjem_`-prefixed symbols).
if nm "$bin" 2>/dev/null | grep ' T _rjem_mallocx$' >/dev/null; then
    where=$bin funcs="_rjem_malloc _rjem_mallocx _rjem_calloc _rjem_realloc _rjem_rallocx"
else
    where=$(ldd "$bin" | awk '/libc.so.6/ {print $3}') funcs="malloc realloc calloc"
fi
# (probes left by an earlier run may point at another binary)
perf probe -q -d 'allocs:*' 2>/dev/null || true
events=()
for f in $funcs; do
    # (event names are unique across groups: probe_libc:malloc may exist already)
    perf probe -q -x "$where" -a "allocs:count_$f=$f" 2>/dev/null || true
    events+=("allocs:count_$f")
done
dir=$(mktemp -d)
url=http://127.0.0.1:23790
"$bin" --name ab --data-dir "$dir" --listen-client-urls $url --advertise-client-urls $url \
    --listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
    --initial-cluster ab=http://127.0.0.1:23800 >"$dir.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir" "$dir.log"' EXIT
for _ in $(seq 1 100); do (echo >/dev/tcp/127.0.0.1/23790) 2>/dev/null && break; sleep 0.1; done
"$bench" run --endpoints 127.0.0.1:23790 --workload "$workload" --clients "$clients" --duration 8s >/dev/null 2>&1 &
load=$!
sleep 2
rev() {
    ETCDCTL_API=3 etcdctl --endpoints 127.0.0.1:23790 endpoint status -w json |
        python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["Status"]["header"]["revision"])'
}
r0=$(rev)
counts=$(perf stat -x, -e "$(IFS=,; echo "${events[*]}")" -p $pid -- sleep 4 2>&1 >/dev/null)
r1=$(rev)
wait $load
echo "$counts" | awk -F, -v n=$((r1 - r0)) '{s += $1} END {printf "%d writes, %.1f allocations per write\n", n, s / n}'
