#!/usr/bin/env bash
# Instructions per request: the gateway under valgrind's callgrind, which
# counts instructions rather than time, so the figure repeats from run to
# run whatever else the machine is doing (the timed benchmarks on a shared
# 2-core VM move by 10-20 %). Four modes, as the timed benchmarks have them:
#   off     no limits, no ledger (auth, routing, JSON access log): what
#           bench/money.sh measures money against
#   plain   no limits (auth, routing, ledger row, JSON access log)
#   limits  four limits (rpm, tpm, rpd, tpd: token estimate, admission,
#           settlement), never refusing
#   money   the four limits, a key budget and a prepaid account (hold,
#           reservation, settlement), never refusing
#   billing a key budget, an org budget and a prepaid account without
#           limits: bench/money.sh's `money` (run it with MODES=billing)
# Counting starts after a warm-up and covers only the measured requests
# (REQUESTS at 400 req/s over 8 connections); the mock runs natively.
#
#   bench/instructions.sh              all four modes
#   MODES=money KEEP=/tmp/cg bench/instructions.sh
#       keeps callgrind.out.MODE there, for callgrind_annotate
#
# valgrind hides SHA-NI from the program, so the bearer key's SHA-256 is
# counted in its software form (about 7k instructions; far less natively).
set -euo pipefail
cd "$(dirname "$0")/.."
MODES=${MODES:-"off plain limits money"}
REQUESTS=${REQUESTS:-4000}
command -v valgrind >/dev/null || { echo "needs valgrind: apt-get install -y valgrind"; exit 1; }

cargo build --release -q -p tollgate -p tollgate-loadgen
source bench/lib.sh
MOCK_PORT=$(free_port)
"$BIN/tollgate" mock --listen "127.0.0.1:$MOCK_PORT" >"$work/mock.out" 2>&1 &

measure() { # mode
  local mode=$1 dir="$work/$1" port out
  port=$(free_port)
  out=${KEEP:+$KEEP/callgrind.out.$mode}
  out=${out:-$dir/callgrind.out}
  mkdir -p "$dir" ${KEEP:+"$KEEP"}
  gateway_toml "127.0.0.1:$port" "$([ "$mode" = off ] && echo false || echo true)" >"$dir/tollgate.toml"
  local args=(--name bench --json)
  if [ "$mode" = limits ] || [ "$mode" = money ]; then
    args+=("${FAR_LIMITS[@]}")
  fi
  if [ "$mode" = money ] || [ "$mode" = billing ]; then
    (cd "$dir" && "$BIN/tollgate" credits add bench 1000000 --why "instructions bench" >/dev/null \
      && "$BIN/tollgate" budgets set key:bench --window day --cap 1000000 >/dev/null)
    args+=(--account bench)
  fi
  if [ "$mode" = billing ]; then
    (cd "$dir" && "$BIN/tollgate" budgets set org --window day --cap 1000000 >/dev/null)
  fi
  local key
  key=$(cd "$dir" && "$BIN/tollgate" keys create "${args[@]}" | grep -o 'tg-[0-9a-f]\{64\}')
  (cd "$dir" && exec env BENCH_UPSTREAM_KEY=sk-bench-upstream RUST_LOG=info \
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
    "$BIN/tollgate" --log-format json serve >"$dir/serve.out" 2>"$dir/serve.log") &
  local vg=$!
  await_gateway "$dir" 600
  local pid
  pid=$(pgrep -f -- "--callgrind-out-file=$out" | head -1)
  local url="http://127.0.0.1:$port/v1/chat/completions"
  "$BIN/tollgate-loadgen" --url "$url" --key "$key" --rate 200 --duration 3 --warmup 1 --connections 8 >/dev/null
  callgrind_control -i on "$pid" >/dev/null 2>&1
  "$BIN/tollgate-loadgen" --url "$url" --key "$key" --rate 400 --duration "$((REQUESTS / 400))" \
    --warmup 0 --connections 8 >"$dir/load.json"
  callgrind_control -i off "$pid" >/dev/null 2>&1
  callgrind_control -d "$pid" >/dev/null 2>&1
  kill "$pid"
  wait "$vg" 2>/dev/null || true
  python3 - "$mode" "$dir/load.json" "$out".1 <<'PY'
import json, re, sys
mode, load, profile = sys.argv[1:]
requests = json.load(open(load))["requests"]
total = 0
for line in open(profile):
    m = re.match(r"(?:summary|totals): (\d+)", line)
    if m:
        total = int(m.group(1))
print(f"{mode}: {total / requests / 1000:.1f}k instructions a request ({requests} requests, {total} instructions)")
PY
}

for mode in $MODES; do
  measure "$mode"
done
