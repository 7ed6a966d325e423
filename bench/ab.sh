#!/usr/bin/env bash
# Two builds of the gateway side by side: each in front of the same
# simulated provider, run at full speed in turn (the order swapped every
# other round), so that both meet the same moments of the host's drift.
# Throughput on these shared 2-core VMs moves 10-20 % from run to run; the
# gateway's CPU a request against the mock's moves far less (both processes
# slow down alike), so a change of 1-2 % in the gateway's own cost shows in
# that ratio where throughput cannot show it.
#
#   bench/ab.sh OLD_BINARY NEW_BINARY [DURATION_SECONDS]   (default 8)
#   ROUNDS=12 LEDGER=true bench/ab.sh /tmp/tollgate-old target/release/tollgate
#
# Build the old one first, e.g.:
#   git stash; cargo build --release -p tollgate; cp target/release/tollgate /tmp/tollgate-old; git stash pop
# Prints each round and, for NEW against OLD, the medians of the paired
# ratios with 95 % bootstrap intervals.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=$(realpath "$1")
NEW=$(realpath "$2")
DURATION=${3:-8}
ROUNDS=${ROUNDS:-12}
CONNS=${CONNS:-32}

cargo build --release -q -p tollgate-loadgen
source bench/lib.sh
MOCK_PORT=$(free_port)
"$NEW" mock --listen "127.0.0.1:$MOCK_PORT" >"$work/mock.out" 2>&1 &
mock_pid=$!

start() { # name binary: a gateway of its own (directory, port, key), ledger as LEDGER says
  local name=$1 bin=$2 dir="$work/$1" port
  port=$(free_port)
  mkdir -p "$dir"
  gateway_toml "127.0.0.1:$port" "${LEDGER:-false}" >"$dir/tollgate.toml"
  key[$name]=$(cd "$dir" && "$bin" keys create --name bench --json | grep -o 'tg-[0-9a-f]\{64\}')
  (cd "$dir" && exec env BENCH_UPSTREAM_KEY=sk-bench-upstream RUST_LOG=info \
    "$bin" --log-format json serve >serve.out 2>serve.log) &
  pid[$name]=$!
  await_gateway "$dir" 100
  url[$name]="http://127.0.0.1:$port/v1/chat/completions"
}
declare -A key pid url
start old "$OLD"
start new "$NEW"

results="$work/results.jsonl"
for round in $(seq 1 "$ROUNDS"); do
  order="old new"
  [ $((round % 2)) = 0 ] && order="new old"
  for name in $order; do
    gateway=$(cpu_ticks "${pid[$name]}") mock=$(cpu_ticks "$mock_pid")
    out=$("$BIN/tollgate-loadgen" --label "$name" --url "${url[$name]}" --key "${key[$name]}" \
      --duration "$DURATION" --warmup 1 --connections "$CONNS")
    gateway=$(($(cpu_ticks "${pid[$name]}") - gateway)) mock=$(($(cpu_ticks "$mock_pid") - mock))
    echo "$out" | sed "s/^{/{\"round\":$round,\"gateway_ticks\":$gateway,\"mock_ticks\":$mock,/" | tee -a "$results"
  done
done

python3 - "$results" <<'PY'
import json, random, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
by = {}
for r in runs:
    by.setdefault(r["label"], {})[r["round"]] = r
rounds = sorted(by["old"])
random.seed(7)

def summary(what, ratios):
    boots = sorted(statistics.median(random.choices(ratios, k=len(ratios))) for _ in range(10000))
    print(f"| {what} | {statistics.median(ratios):.3f} | {boots[250]:.3f}–{boots[9750]:.3f} |")

cpu = lambda r: r["gateway_ticks"] / max(r["mock_ticks"], 1)
print(f"\nrequests/s, medians of {len(rounds)} rounds: old {statistics.median(by['old'][n]['rps'] for n in rounds):.0f}, "
      f"new {statistics.median(by['new'][n]['rps'] for n in rounds):.0f}")
print("gateway CPU / mock CPU, medians: old "
      f"{statistics.median(cpu(by['old'][n]) for n in rounds):.3f}, new {statistics.median(cpu(by['new'][n]) for n in rounds):.3f}\n")
print("| new / old, paired by round | median | 95 % interval |")
print("|---|---|---|")
summary("requests/s", [by["new"][n]["rps"] / by["old"][n]["rps"] for n in rounds])
summary("gateway CPU a request, against the mock's", [cpu(by["new"][n]) / cpu(by["old"][n]) for n in rounds])
PY
