#!/usr/bin/env bash
# Money benchmark: the gateway at full speed in front of the simulated
# provider, three ways, alternated over ROUNDS rounds in one run:
#   off     [money] ledger = false, a key without budgets or account
#   ledger  the usage ledger on (a row per request, group-committed)
#   money   the ledger on, and a key drawing on a prepaid account under a
#           key budget and an org budget (estimate, reservation, hold,
#           settlement and row on every request; never refusing)
# Prints one JSON line per run and a Markdown table with each mode's
# throughput against `off`. Then the ledger's own rate: rows per second
# SQLite sustains through the group-committing writer, without HTTP.
#
#   bench/money.sh [DURATION_SECONDS]     (default 10; ROUNDS=2, CONNS=32)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10}
CONNS=${CONNS:-32}
ROUNDS=${ROUNDS:-2}

cargo build --release -q -p tollgate -p tollgate-loadgen
source bench/lib.sh
MOCK_PORT=$(free_port)
"$BIN/tollgate" mock --listen "127.0.0.1:$MOCK_PORT" >"$work/mock.out" 2>&1 &

# One directory (database) per mode, each set up by the CLI.
setup() {
  local mode=$1 ledger=$2 dir="$work/$1"
  mkdir -p "$dir"
  cat >"$dir/tollgate.toml" <<TOML
[server]
listen = "127.0.0.1:0"

[money]
ledger = $ledger

$(mock_deployment)
TOML
  if [ "$mode" = money ]; then
    (cd "$dir" && "$BIN/tollgate" credits add bench 100000.00 --why benchmark >/dev/null \
      && "$BIN/tollgate" budgets set key:bench --window month --cap 100000.00 >/dev/null \
      && "$BIN/tollgate" budgets set org --window day --cap 100000.00 >/dev/null \
      && "$BIN/tollgate" keys create --name bench --account bench --json >"$dir/key.json")
  else
    (cd "$dir" && "$BIN/tollgate" keys create --name bench --json >"$dir/key.json")
  fi
}
setup off false
setup ledger true
setup money true

results="$work/results.jsonl"
for round in $(seq 1 "$ROUNDS"); do
  for mode in off ledger money; do
    dir="$work/$mode"
    port=$(free_port)
    sed -i "s/^listen = .*/listen = \"127.0.0.1:$port\"/" "$dir/tollgate.toml"
    key=$(grep -o 'tg-[0-9a-f]\{64\}' "$dir/key.json")
    (cd "$dir" && exec env BENCH_UPSTREAM_KEY=sk-bench RUST_LOG=warn "$BIN/tollgate" serve >"$dir/serve.out" 2>"$dir/serve.log") &
    pid=$!
    for _ in $(seq 1 100); do grep -q "listening on" "$dir/serve.out" 2>/dev/null && break; sleep 0.1; done
    "$BIN/tollgate-loadgen" --label "$mode" --url "http://127.0.0.1:$port/v1/chat/completions" --key "$key" \
      --rate 0 --duration "$DURATION" --connections "$CONNS" | tee -a "$results"
    kill -TERM "$pid"; wait "$pid" || true
  done
done
rows=$(cd "$work/money" && "$BIN/tollgate" usage --by key --json | python3 -c 'import json,sys; print(sum(r["requests"] for r in json.load(sys.stdin)))')
echo "ledger rows written in the money runs (warm-up included): $rows"

python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault(r["label"], []).append(r)
base = statistics.mean(r["rps"] for r in by["off"])
print()
# The host's speed drifts between runs; a round's modes run back to back,
# so each mode against the same round's `off` cancels most of the drift.
print("| mode | runs | req/s (mean) | vs off (means) | vs off (median of rounds) | rounds' range | p50 µs | p99 µs | errors |")
print("|---|---|---|---|---|---|---|---|---|")
for mode in ("off", "ledger", "money"):
    rs = by[mode]
    rps = statistics.mean(r["rps"] for r in rs)
    p50 = statistics.mean(r["p50_us"] for r in rs)
    p99 = statistics.mean(r["p99_us"] for r in rs)
    ratios = [100 * r["rps"] / o["rps"] for r, o in zip(rs, by["off"])]
    print(f"| {mode} | {len(rs)} | {rps:.0f} | {100 * rps / base:.1f}% | {statistics.median(ratios):.1f}% "
          f"| {min(ratios):.0f}–{max(ratios):.0f}% | {p50:.0f} | {p99:.0f} | {sum(r['errors'] for r in rs)} |")
PY

echo
echo "Ledger writer alone (rows/s through group commit into SQLite WAL):"
cargo bench -q -p tollgate-store --bench ledger 2>/dev/null
