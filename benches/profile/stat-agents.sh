#!/bin/bash
# perf stat on every agent an e2e bench run starts (A/B runs with --bin/--before), one line each.
# usage: benches/profile/stat-agents.sh OUT [e2e bench args...]
#   e.g. benches/profile/stat-agents.sh target/prof/ab --scenario compression-grpc --runs 3 \
#          --bin /tmp/telespool-new --before /tmp/telespool-old
# Needs the bench binary built (cargo bench --bench e2e --no-run). Counters: PERF_STAT, default
# task-clock, context switches, writev/setsockopt/recvfrom syscalls, page faults.
out=$1; shift
cd "$(dirname "$0")/../.."
bench_bin=$(ls -t ${CARGO_TARGET_DIR:-target}/release/deps/e2e-* | grep -v '\.d$' | head -1)
events=${PERF_STAT:-task-clock,context-switches,syscalls:sys_enter_writev,syscalls:sys_enter_setsockopt,syscalls:sys_enter_recvfrom,page-faults}
rm -f "$out".pids
"$bench_bin" --bench "$@" > "$out".log 2>&1 &
bench=$!
seen=""
while kill -0 $bench 2>/dev/null; do
  for pid in $(grep -o '^\[agent [0-9]*\].*listening' "$out".log | grep -o '^\[agent [0-9]*' | grep -o '[0-9]*'); do
    case " $seen " in *" $pid "*) continue;; esac
    seen="$seen $pid"
    perf stat -e "$events" -p "$pid" -o "$out.$pid.stat" &
    echo "$pid $(readlink /proc/$pid/exe)" >> "$out".pids
  done
  sleep 0.02
done
wait
for pid in $seen; do
  printf "%s %s " "$pid" "$(basename "$(grep "^$pid " "$out".pids | cut -d' ' -f2)")"
  awk '/ (msec|[a-z:_-]+) / && $1 ~ /^[0-9.,]+$/ {printf "%s=%s ", $2, $1}' "$out.$pid.stat"
  echo
done
