#!/bin/bash
# Profiling aid for issue 17: run the e2e bench and perf-record the first agent it starts.
# Output: target/prof/NAME.{log,data,stat}. Then: perf script -i target/prof/NAME.data > NAME.script;
# python3 benches/profile/categories.py NAME.script
# usage: [PERF_G="--call-graph dwarf,32768 -F 1500"] benches/profile/record-agent.sh NAME [bench args...]
# (the agent of the first run that logs "listening"; recorded until it is told to stop)
name=$1; shift
cd "$(dirname "$0")/../.."
mkdir -p target/prof

out=target/prof/$name
cargo bench --bench e2e -- "$@" > $out.log 2>&1 &
bench=$!
pid=""
while kill -0 $bench 2>/dev/null; do
  pid=$(grep -o '^\[agent [0-9]*\].*listening' $out.log | head -1 | grep -o '[0-9]*' | head -1)
  [ -n "$pid" ] && break
  sleep 0.05
done
if [ -n "$pid" ]; then
  perf stat -e ${PERF_STAT:-task-clock,context-switches} -p $pid -o $out.stat &
  st=$!
  perf record -F 2000 ${PERF_G} -p $pid -o $out.data > /dev/null 2>&1 &
  rec=$!
  while kill -0 $pid 2>/dev/null; do
     grep -q "stop signal received" <(grep "^\[agent $pid\]" $out.log) && break
     sleep 0.05
  done
  kill -INT $rec $st 2>/dev/null
  wait $rec $st
fi
wait $bench
echo "pid=$pid"
