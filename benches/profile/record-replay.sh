#!/bin/bash
# Profiling aid for issue 17 item 5: run the replay-live scenario once and, for the
# agent that replays the backlog under live load (the third agent the bench starts),
# record perf samples of that agent and of the bench process (load clients + sink)
# for RECORD_S seconds, and each agent thread's CPU time every 0.5 s.
# Output: target/prof/NAME.{log,data,threads}.
# usage: [BIN=path/to/telespool] [RECORD_S=4] benches/profile/record-replay.sh NAME
name=$1; shift
cd "$(dirname "$0")/../.."
mkdir -p target/prof
out=target/prof/$name
bin=${BIN:-target/release/telespool}
bench=$(ls -t target/release/deps/e2e-* | grep -v '\.d$' | head -1)
$bench --bench --scenario replay-live --bin "$bin" > $out.log 2>&1 &
bpid=$!
pid=""
while kill -0 $bpid 2>/dev/null; do
  pid=$(grep -o '^\[agent [0-9]*\].*listening' $out.log | grep -o '^\[agent [0-9]*' | grep -o '[0-9]*' | uniq | sed -n 3p)
  [ -n "$pid" ] && break
  sleep 0.02
done
[ -z "$pid" ] && { echo "no third agent"; wait $bpid; exit 1; }
perf record ${PERF_G:--F 499 --call-graph dwarf,16384} -p $pid,$bpid -o $out.data > /dev/null 2>&1 &
rec=$!
: > $out.threads
for i in $(seq 1 $((${RECORD_S:-4} * 2))); do
  echo "t=$i" >> $out.threads
  for t in /proc/$pid/task/*; do
    # comm utime stime (ticks)
    echo "$(cat $t/comm 2>/dev/null) $(awk '{print $14, $15}' $t/stat 2>/dev/null)" >> $out.threads
  done
  sleep 0.5
done
kill -INT $rec; wait $rec
wait $bpid
echo "pid=$pid bench=$bpid"
