# Shared by the bench/*.sh scripts (sourced after their build): where the
# release binaries are, a scratch directory removed on exit together with
# every background job, and a free loopback port.
BIN=$PWD/target/release
work=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
