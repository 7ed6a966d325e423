#!/usr/bin/env bash
# Zero 429s by design: 2,000 chat requests through `tollgate batch` (paced
# under the provider's limits) against the simulated provider at RPM 600 and
# TPM 60,000, then the same workload through a naive client (retry on 429
# with fixed exponential backoff, no pacing, Retry-After ignored). Reports
# completion time against the theoretical minimum, 429s and wasted requests.
#
#   bench/batch.sh            (about 5 minutes: each run is ~140 s by design)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-2000}
RPM=${RPM:-600}
TPM=${TPM:-60000}
MAX_TOKENS=${MAX_TOKENS:-50}

cargo build --release -q -p tollgate
source bench/lib.sh

python3 - "$work/requests.jsonl" "$N" "$MAX_TOKENS" <<'PY'
import json, sys
path, n, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(path, "w") as f:
    for i in range(n):
        f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "max_tokens": max_tokens,
                     "messages": [{"role": "user", "content": f"item {i}"}]}}) + "\n")
PY

start_mock() {
  local port
  port=$(free_port)
  "$BIN/tollgate" mock --listen "127.0.0.1:$port" --rpm "$RPM" --tpm "$TPM" >"$work/mock-$1.out" 2>&1 &
  for _ in $(seq 1 100); do curl -s "http://127.0.0.1:$port/v1/models" >/dev/null 2>&1 && break; sleep 0.1; done
  echo "$port"
}

# Paced: tollgate batch knowing the limits.
port=$(start_mock paced)
paced=$("$BIN/tollgate" batch "$work/requests.jsonl" -o "$work/paced.jsonl" --base-url "http://127.0.0.1:$port/v1" \
  --api-key sk-bench --rpm "$RPM" --tpm "$TPM" --concurrency 64 --json)
paced_stats=$(curl -s "http://127.0.0.1:$port/mock/stats")

# Naive: 64 threads, retry on 429 after 0.1 s · 2^attempt, nothing else.
port=$(start_mock naive)
naive=$(python3 - "$work/requests.jsonl" "http://127.0.0.1:$port/v1/chat/completions" <<'PY'
import json, sys, threading, time, urllib.request, urllib.error
lines = [json.loads(l) for l in open(sys.argv[1])]
url = sys.argv[2]
lock = threading.Lock()
state = {"next": 0, "sent": 0, "throttled": 0, "failed": 0}
def worker():
    while True:
        with lock:
            i = state["next"]; state["next"] += 1
        if i >= len(lines):
            return
        body = json.dumps(lines[i]["body"]).encode()
        for attempt in range(12):
            req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", "Authorization": "Bearer sk-bench"})
            with lock:
                state["sent"] += 1
            try:
                urllib.request.urlopen(req, timeout=60).read()
                break
            except urllib.error.HTTPError as e:
                if e.code != 429:
                    with lock: state["failed"] += 1
                    break
                with lock: state["throttled"] += 1
                time.sleep(0.1 * 2 ** attempt)
        else:
            with lock: state["failed"] += 1
t0 = time.monotonic()
threads = [threading.Thread(target=worker) for _ in range(64)]
[t.start() for t in threads]; [t.join() for t in threads]
state["seconds"] = time.monotonic() - t0
print(json.dumps(state))
PY
)
naive_stats=$(curl -s "http://127.0.0.1:$port/mock/stats")

python3 - "$paced" "$paced_stats" "$naive" "$naive_stats" "$N" "$RPM" "$TPM" "$MAX_TOKENS" <<'PY'
import json, sys
paced, pstats, naive, nstats = (json.loads(a) for a in sys.argv[1:5])
n, rpm, tpm, max_tokens = (int(a) for a in sys.argv[5:9])
# The mock charges prompt + max_tokens up front; "item i" prompts are ~9-10 tokens.
per_request = 10 + max_tokens
t_min = max((n - rpm) / (rpm / 60), (n * per_request - tpm) / (tpm / 60), 0)
print(f"theoretical minimum: {t_min:.1f} s ({n} requests, RPM {rpm}, TPM {tpm}, ~{per_request} tokens charged each)")
print()
print("| client | time s | vs minimum | 429s received | requests sent | wasted requests | failed |")
print("|---|---|---|---|---|---|---|")
print(f"| tollgate batch (paced) | {paced['seconds']:.1f} | {100 * (paced['seconds'] / t_min - 1):+.1f} % | {paced['throttled']} | {paced['sent']} | {paced['sent'] - paced['succeeded']} | {paced['failed']} |")
print(f"| naive (retry on 429, fixed backoff) | {naive['seconds']:.1f} | {100 * (naive['seconds'] / t_min - 1):+.1f} % | {naive['throttled']} | {naive['sent']} | {naive['sent'] - (n - naive['failed'])} | {naive['failed']} |")
print()
print(f"mock, paced run: {pstats}")
print(f"mock, naive run: {nstats}")
PY
