# Shared by the bench/*.sh scripts (sourced after their build): where the
# release binaries are, a scratch directory removed on exit together with
# every background job, a free loopback port, a process's CPU, the wait for
# a gateway to start, and a gateway's config in front of the simulated provider.
# The release binaries are in cargo's target directory, wherever
# CARGO_TARGET_DIR puts it: a second build (another profile's settings,
# another commit) can be benchmarked beside the usual one.
BIN=$(realpath "${CARGO_TARGET_DIR:-$PWD/target}")/release
work=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# A process's CPU so far (user and system, all threads), in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# The time the VM's host took from it so far (steal: it ran other guests),
# and all CPU time, in clock ticks, summed over the cores: on a shared host
# a run that lost time this way is slower for reasons no process here has.
host_ticks() { awk '/^cpu /{print $9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
# Waits until the gateway started in DIR has printed its banner (TRIES
# tenths of a second at most); else prints its log and ends the script.
await_gateway() { # dir tries
  for _ in $(seq 1 "$2"); do grep -q "listening on" "$1/serve.out" 2>/dev/null && return 0; sleep 0.1; done
  echo "the gateway in $1 did not start"; cat "$1/serve.log"; exit 1
}
# A gateway's tollgate.toml: listening on LISTEN, the usage ledger on or
# off (true or false), and one deployment, the simulated provider on
# $MOCK_PORT serving the benchmarks' model.
gateway_toml() { # listen ledger
  cat <<TOML
[server]
listen = "$1"

[money]
ledger = $2

[[deployments]]
name = "mock"
provider = "openai_compatible"
base_url = "http://127.0.0.1:$MOCK_PORT/v1"
api_key_env = "BENCH_UPSTREAM_KEY"
models = ["gpt-4o-mini"]
TOML
}
# Four limits (rpm, tpm, rpd, tpd) far above what any run sends: a key
# under them pays for every decision and is never refused.
FAR_LIMITS=(--rpm 1000000000 --tpm 1000000000000 --rpd 1000000000000 --tpd 1000000000000000)
