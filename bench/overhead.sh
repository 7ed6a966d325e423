#!/usr/bin/env bash
# Overhead benchmark: the simulated provider alone, then the gateway in front
# of it (auth on, access log on) with a key without limits and with a key
# under four limits (rpm, tpm, rpd, tpd: token estimate, admission and
# settlement on every request, never refusing), at fixed rates and at full
# speed, in one run on this machine; then both keys in one run, every other
# request, so that what the limits add is measured at the same moments.
# Prints one JSON line per run (two for the mixed run) and Markdown tables,
# among them the CPU a request of the server each run called (the mock, the
# gateway, nginx or HAProxy), user and system apart.
#
#   bench/overhead.sh [DURATION_SECONDS]      (default 10)
#   ROUNDS=5 bench/overhead.sh 8     every rate's runs five times over,
#       alternated (the two keys' order swapped every other round); the
#       tables give each figure's median over the rounds, and the cost of
#       limits as the median of the rounds' paired differences (limits on
#       minus off within one round), with their range and, from five
#       rounds, a 95 % bootstrap interval of that median
#   MIXED_ONLY=1 ROUNDS=15 bench/overhead.sh 8   only the mock and the run
#       with both keys, every other request: what the limits add, measured
#       at the same moments, over more rounds in the same time
#   REDIS=redis://127.0.0.1:6379 bench/overhead.sh 8   limits decided in Redis
#       (prints Redis commands per limited request from INFO commandstats)
#   DATABASE=postgres://postgres@127.0.0.1:5432/test bench/overhead.sh 8
#       keys and ledger on PostgreSQL (a scratch database on that server,
#       dropped at the end) instead of the SQLite file
#   MONEY=1 bench/overhead.sh 8     the limited key also draws on an account
#       and counts against a key budget (both far from running out): a hold
#       and a budget reservation at admission, a settlement and a ledger
#       row per request
#   REFERENCE=1 bench/overhead.sh 8   also nginx and HAProxy (Debian's
#       nginx-light and haproxy) as plain keep-alive reverse proxies in
#       front of the same mock, at each rate: what any proxy adds on this
#       machine, with no auth, limits, ledger or log
#   LEDGER=false bench/overhead.sh 8   the usage ledger off (`[money] ledger =
#       false`), as money.sh's `off`: the gateway of issue #2 alone, with
#       auth and the access log but no row a request
#   DASHBOARD=1 bench/overhead.sh 8           the same with the dashboard open:
#       a session polls /ui/api/summary and /metrics every second (the page
#       polls every 5 s, `tollgate top` /metrics every second), and at the
#       end Chromium loads the page and reports its load time
#
# Everything runs on loopback; the load generator, gateway and mock share the
# machine's cores, which is stated next to the numbers in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10}
CONNS=${CONNS:-32}
RATES=${RATES:-"1000 5000 0"}
ROUNDS=${ROUNDS:-1}

cargo build --release -q -p tollgate -p tollgate-loadgen
source bench/lib.sh
MOCK_PORT=$(free_port)
GW_PORT=$(free_port)

"$BIN/tollgate" mock --listen "127.0.0.1:$MOCK_PORT" >"$work/mock.out" 2>&1 &
MOCK_PID=$!
references=()
if [ "${REFERENCE:-0}" = 1 ]; then
  command -v nginx >/dev/null && command -v haproxy >/dev/null \
    || { echo "REFERENCE=1 needs nginx and haproxy: apt-get install -y nginx-light haproxy"; exit 1; }
  NGINX_PORT=$(free_port)
  HAPROXY_PORT=$(free_port)
  mkdir -p "$work/nginx"
  cat >"$work/nginx/nginx.conf" <<NGINX
worker_processes auto;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  client_body_temp_path $work/nginx/body;
  upstream mock { server 127.0.0.1:$MOCK_PORT; keepalive 256; keepalive_requests 100000000; }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
NGINX
  cat >"$work/haproxy.cfg" <<HAPROXY
global
  nbthread $(nproc)
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend gateway
  bind 127.0.0.1:$HAPROXY_PORT
  default_backend mock
backend mock
  server mock 127.0.0.1:$MOCK_PORT
HAPROXY
  nginx -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log" &
  NGINX_PID=$!
  haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.out" 2>&1 &
  references=("nginx $NGINX_PORT $NGINX_PID" "haproxy $HAPROXY_PORT $!")
fi
gateway_toml "127.0.0.1:$GW_PORT" "${LEDGER:-true}" >"$work/tollgate.toml"
if [ -n "${REDIS:-}" ]; then
  printf '\n[state]\nredis_url = "%s"\nredis_prefix = "tollgate-bench-%s"\n' "$REDIS" "$$" >>"$work/tollgate.toml"
fi
if [ -n "${DATABASE:-}" ]; then
  bench_db="tollgate_bench_$$"
  psql "$DATABASE" -qc "CREATE DATABASE $bench_db"
  printf '\n[database]\nurl = "%s/%s"\n' "${DATABASE%/*}" "$bench_db" >>"$work/tollgate.toml"
fi
# A key under limits far above what the run sends: the cost of deciding, not of refusing.
money_args=()
if [ "${MONEY:-0}" = 1 ]; then
  (cd "$work" && "$BIN/tollgate" credits add bench 1000000 --why "overhead bench" >/dev/null \
    && "$BIN/tollgate" budgets set key:bench-limits --window day --cap 1000000 >/dev/null)
  money_args=(--account bench)
fi
(cd "$work" && "$BIN/tollgate" keys create --name bench-limits "${FAR_LIMITS[@]}" "${money_args[@]}" \
  --json >"$work/limited.json")
LIMITED_KEY=$(grep -o 'tg-[0-9a-f]\{64\}' "$work/limited.json")
ADMIN_KEY=bench-admin-key-0123456789abcdef
(cd "$work" && exec env BENCH_UPSTREAM_KEY=sk-bench-upstream TOLLGATE_ADMIN_KEY=$ADMIN_KEY RUST_LOG=${GATEWAY_LOG:-info} "$BIN/tollgate" --log-format json serve >"$work/serve.out" 2>"$work/serve.log") &
GW_PID=$!
await_gateway "$work" 100
KEY=$(grep -o 'tg-[0-9a-f]\{64\}' "$work/serve.out" | head -1 || true)
[ -z "$KEY" ] && KEY=$(cd "$work" && "$BIN/tollgate" keys create --name bench --json | grep -o 'tg-[0-9a-f]\{64\}')
[ -n "$KEY" ] || { echo "no key: neither the banner nor keys create gave one"; cat "$work/serve.out" "$work/serve.log"; exit 1; }

if [ "${DASHBOARD:-0}" = 1 ]; then
  curl -sf -c "$work/cookies" -H 'content-type: application/json' -d "{\"key\":\"$ADMIN_KEY\"}" \
    "http://127.0.0.1:$GW_PORT/ui/login" || { echo "dashboard login failed"; exit 1; }
  (while true; do
    curl -sf -b "$work/cookies" "http://127.0.0.1:$GW_PORT/ui/api/summary?window=hour" -o /dev/null -w '%{time_total}\n' >>"$work/summary-times"
    curl -sf "http://127.0.0.1:$GW_PORT/metrics" -o /dev/null
    sleep 1
  done) &
fi

[ -n "${REDIS:-}" ] && redis-cli -u "$REDIS" CONFIG RESETSTAT >/dev/null
results="$work/results.jsonl"
run() { # label url pid [key [loadgen options]]: one loadgen run at $rate, its JSON lines tagged with $round
  local label=$1 url=$2 pid=$3 key=${4:-} watch=()
  shift $(($# < 4 ? $# : 4))
  # The CPU of the server called (the process and its children: nginx's
  # workers) while the run is measured.
  for p in "$pid" $(pgrep -P "$pid"); do watch+=(--watch "$p"); done
  "$BIN/tollgate-loadgen" --label "$label" --url "$url/v1/chat/completions" ${key:+--key "$key"} \
    --rate "$rate" --duration "$DURATION" --connections "$CONNS" "${watch[@]}" "$@" | sed "s/^{/{\"round\":$round,/" | tee -a "$results"
}
through_gateway() { # label key log-suffix [loadgen options]
  local from label=$1 key=$2 suffix=$3
  shift 3
  from=$(wc -l <"$work/serve.log")
  run "$label" "http://127.0.0.1:$GW_PORT" "$GW_PID" "$key" "$@"
  # The gateway's own time per request, from its access log (JSON lines,
  # RUST_LOG=info only): total handler time minus the wait on the upstream.
  tail -n +"$((from + 1))" "$work/serve.log" >"$work/run-$rate-$round$suffix.log"
}
for round in $(seq 1 "$ROUNDS"); do
  for rate in $RATES; do
    run mock "http://127.0.0.1:$MOCK_PORT" "$MOCK_PID"
    for reference in "${references[@]}"; do
      set -- $reference
      run "$1" "http://127.0.0.1:$2" "$3"
    done
    # Even rounds take the limited key first: whatever the second run of a
    # pair inherits (a longer ledger, a warmer cache) falls on both sides.
    if [ "${MIXED_ONLY:-0}" = 1 ]; then
      :
    elif [ $((round % 2)) = 1 ]; then
      through_gateway gateway "$KEY" ""
      through_gateway gateway+limits "$LIMITED_KEY" -limits
    else
      through_gateway gateway+limits "$LIMITED_KEY" -limits
      through_gateway gateway "$KEY" ""
    fi
    # Both keys in one run, every other request: limits on against off at
    # the same moments (even rounds give the limited key the even slots).
    keys=("$KEY" "$LIMITED_KEY") labels=(interleaved interleaved+limits)
    first=$((round % 2 == 1 ? 0 : 1))
    through_gateway "${labels[$first]}" "${keys[$first]}" -interleaved \
      --compare-key "${keys[$((1 - first))]}" --compare-label "${labels[$((1 - first))]}"
  done
done

if [ "${DASHBOARD:-0}" = 1 ]; then
  echo "dashboard summary polls: $(wc -l <"$work/summary-times"), slowest $(sort -n "$work/summary-times" | tail -1) s, median $(sort -n "$work/summary-times" | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}') s"
  node_dir=target/tmp/ui-node
  if [ ! -d "$node_dir/node_modules/playwright-core" ]; then
    node_dir=$work/ui-node && mkdir -p "$node_dir"
    cp crates/tollgate-gateway/tests/ui/package*.json "$node_dir" && (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error)
  fi
  cp crates/tollgate-gateway/tests/ui/dashboard.mjs "$node_dir/"
  for _ in 1 2 3; do
    node "$node_dir/dashboard.mjs" "http://127.0.0.1:$GW_PORT" "$ADMIN_KEY" "$work/shot.png" >"$work/page.json"
    python3 - "$work/page.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"page load (Chromium navigation timing): {d['load_ms']:.0f} ms, {d['requests']} requests charted")
PY
  done
fi

if [ -n "${REDIS:-}" ]; then
  redis-cli -u "$REDIS" INFO commandstats >"$work/commandstats"
  python3 - "$results" "$work/commandstats" <<'PY'
import json, sys
limited = sum(json.loads(l)["requests"] for l in open(sys.argv[1]) if '"gateway+limits"' in l)
print(f"\nRedis commands ({limited} limited requests measured, warm-ups not counted):")
for line in open(sys.argv[2]):
    if line.startswith("cmdstat_"):
        name, rest = line.strip()[len("cmdstat_"):].split(":", 1)
        f = dict(kv.split("=") for kv in rest.split(","))
        if int(f["calls"]) >= 100:
            print(f"  {name}: {f['calls']} calls ({int(f['calls']) / max(limited, 1):.2f} per limited request), {f['usec_per_call']} µs each in Redis")
PY
fi
if [ -n "${DATABASE:-}" ]; then
  kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true
  psql "$DATABASE" -qc "DROP DATABASE IF EXISTS $bench_db WITH (FORCE)"
fi

python3 - "$results" "$ROUNDS" "$(getconf CLK_TCK)" <<'PY'
import json, os, random, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rounds = int(sys.argv[2])
tick_us = 1e6 / int(sys.argv[3])
work = os.path.dirname(sys.argv[1])
median = statistics.median
span = lambda v: f"{min(v)} to {max(v)}" if v else ""  # a list's range

def overhead(rate, rnd, suffix="", limited=None):
    """p50/p99/p99.9 of the gateway's in-process time per request (µs);
    with `limited` True or False, only the limited key's requests or only
    the other key's (the interleaved runs have both)."""
    path = os.path.join(work, f"run-{rate}-{rnd}{suffix}.log")
    vals = []
    for line in open(path) if os.path.exists(path) else []:
        try:
            f = json.loads(line)
        except ValueError:
            continue
        if "overhead_us" in f and (limited is None or (f.get("key") == "bench-limits") == limited):
            vals.append(f["overhead_us"])
    if not vals:
        return None
    vals.sort()
    q = lambda p: vals[min(len(vals) - 1, int(p * len(vals)))]
    return q(0.5), q(0.99), q(0.999)

# runs[rate][label] = that target's runs, one per round, in round order.
runs = {}
for r in rows:
    runs.setdefault(r["target_rate"], {}).setdefault(r["label"], []).append(r)
print()
if rounds > 1:
    print(f"Medians over {rounds} alternated rounds; \"added\" is the median of each round's difference to the mock of the same round.")
    print()
print("| rate (req/s) | target | achieved req/s | errors | p50 µs | p99 µs | p99.9 µs | added p50 µs | added p99 µs |")
print("|---|---|---|---|---|---|---|---|---|")
for rate, targets in runs.items():
    mock = targets["mock"]
    for label, rs in targets.items():
        if label.startswith("interleaved"):
            continue
        rps = median(r["rps"] for r in rs)
        added = ("", "")
        share = ""
        if label != "mock":
            added = tuple(round(median(r[k] - m[k] for r, m in zip(rs, mock))) for k in ("p50_us", "p99_us"))
            if not rate:
                share = f" ({median(r['rps'] / m['rps'] for r, m in zip(rs, mock)):.0%} of the mock)"
        p = [round(median(r[k] for r in rs)) for k in ("p50_us", "p99_us", "p999_us")]
        print(f"| {rate or 'full speed'} | {label} | {rps:.0f}{share} | {sum(r['errors'] for r in rs)} | {p[0]} | {p[1]} | {p[2]} | {added[0]} | {added[1]} |")
print()
print("CPU a request of the server called while the run was measured (the mock alone, else the proxy in front of it; all its threads and processes), medians of the rounds:")
print()
print("| rate (req/s) | target | user µs | system µs | total µs | against the mock's |")
print("|---|---|---|---|---|---|")
for rate, targets in runs.items():
    cpu = {}
    for label, rs in targets.items():
        watched = [r for r in rs if r.get("watched_user_ticks") is not None]
        # A run with both keys measures the gateway over both keys' requests.
        if label.startswith("interleaved") or not watched:
            continue
        user = median(r["watched_user_ticks"] * tick_us / r["requests"] for r in watched)
        system = median(r["watched_system_ticks"] * tick_us / r["requests"] for r in watched)
        cpu[label] = user + system
        against = f"{cpu[label] / cpu['mock']:.2f}" if cpu.get("mock") else ""
        print(f"| {rate or 'full speed'} | {label} | {user:.1f} | {system:.1f} | {user + system:.1f} | {against} |")
separate = [(rate, targets) for rate, targets in runs.items() if "gateway" in targets]
if separate:
    print()
    print("Gateway's own time per request (handler time minus the wait on the upstream; from the access log):")
    print()
    print("| rate (req/s) | key | internal p50 µs | internal p99 µs | internal p99.9 µs |")
    print("|---|---|---|---|---|")
internal = {}
for rate, _ in separate:
    for label, suffix in (("no limits", ""), ("4 limits", "-limits")):
        os_ = [overhead(rate, n, suffix) for n in range(1, rounds + 1)]
        internal[(rate, suffix)] = os_
        if all(os_):
            q = [round(median(o[i] for o in os_)) for i in range(3)]
            print(f"| {rate or 'full speed'} | {label} | {q[0]} | {q[1]} | {q[2]} |")
print()
def interval(diffs):
    """95 % bootstrap interval of the median of the rounds' differences
    (rounds resampled whole; seeded, so the same runs give the same
    interval). Fewer than five rounds say too little to resample."""
    if len(diffs) < 5:
        return ""
    pick = random.Random(1)
    medians = sorted(median(pick.choices(diffs, k=len(diffs))) for _ in range(4000))
    tail = len(medians) // 40
    return f"{round(medians[tail])} to {round(medians[-tail - 1])}"

if separate:
    print("What the four limits add, limits on minus off within each round (median, the rounds' range and, from five rounds, a 95 % interval of the median):")
    print()
    print("| rate (req/s) | end-to-end p50 µs | range | 95 % interval | internal p50 µs | range | 95 % interval |")
    print("|---|---|---|---|---|---|---|")
for rate, targets in separate:
    e2e = [l["p50_us"] - g["p50_us"] for l, g in zip(targets["gateway+limits"], targets["gateway"])]
    off, on = internal[(rate, "")], internal[(rate, "-limits")]
    inner = [b[0] - a[0] for a, b in zip(off, on) if a and b]
    inner_median = round(median(inner)) if inner else ""
    print(f"| {rate or 'full speed'} | {round(median(e2e))} | {span(e2e)} | {interval(e2e)} | {inner_median} | {span(inner)} | {interval(inner)} |")

print()
print("What the four limits add with both keys in one run, every other request (limits on minus off within each run; median, range and, from five rounds, a 95 % interval of the median):")
print()
print("| rate (req/s) | p50 off µs | p50 on µs | end-to-end p50 µs | range | 95 % interval | end-to-end p99 µs | internal p50 µs | range | 95 % interval |")
print("|---|---|---|---|---|---|---|---|---|---|")
for rate, targets in runs.items():
    off, on = targets.get("interleaved"), targets.get("interleaved+limits")
    if not (off and on):
        continue
    e2e = [l["p50_us"] - g["p50_us"] for l, g in zip(on, off)]
    tail = [l["p99_us"] - g["p99_us"] for l, g in zip(on, off)]
    inner = []
    for n in range(1, rounds + 1):
        a, b = overhead(rate, n, "-interleaved", False), overhead(rate, n, "-interleaved", True)
        if a and b:
            inner.append(b[0] - a[0])
    inner_median = round(median(inner)) if inner else ""
    print(f"| {rate or 'full speed'} | {round(median(g['p50_us'] for g in off))} | {round(median(l['p50_us'] for l in on))} "
          f"| {round(median(e2e))} | {span(e2e)} | {interval(e2e)} | {round(median(tail))} | {inner_median} | {span(inner)} | {interval(inner)} |")
PY
