#!/usr/bin/env bash
# The main job on this host: a CA, a DSO, an LM simulator and a gateway, then
# an operator driving the LM through the secure channel with the real commands.
set -euo pipefail
bin=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin
work=$(mktemp -d /tmp/lmgw-demo.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
free_port() { "$bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { for _ in $(seq 100); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.2; done; echo "timeout waiting for '$2' in $1" >&2; cat "$1" >&2; exit 1; }

dso_port=$(free_port); lm_port=$(free_port); crl_port=$(free_port); api_port=$(free_port)
ca="$work/ca"
say "1. The DSO's certificate authority (ECDSA P-256), DSO server certificate, factory-issued gateway identity"
"$bin/lmgw-pki" --ca-dir "$ca" init --name "Demo DSO LMGW CA"
"$bin/lmgw-pki" --ca-dir "$ca" server-cert --dns localhost --ip 127.0.0.1 --out-key "$work/dso.key" --out-cert "$work/dso.crt"
"$bin/lmgw-pki" --ca-dir "$ca" gateway-cert --id GW-DEMO-0001 --out-dir "$work/identity"
"$bin/lmgw-pki" --ca-dir "$ca" operator-cert --name demo-operator --role operator --out-key "$work/operator.key" --out-cert "$work/operator.crt"
"$bin/lmgw-pki" --ca-dir "$ca" serve --port "$crl_port" >"$work/pki.log" 2>&1 & pids+=($!)

say "2. A load manager simulator on Modbus TCP (4 relays, power readings)"
"$bin/lmgw-lmsim" --tcp "127.0.0.1:$lm_port" >"$work/lmsim.log" 2>&1 < /dev/null & pids+=($!)

cat >"$work/dso.toml" <<TOML
[listen]
host = "127.0.0.1"
port = $dso_port
[tls]
ca_file = "$ca/ca.crt"
cert_file = "$work/dso.crt"
key_file = "$work/dso.key"
[revocation]
crl_file = "$ca/crl.der"
ca_dir = "$ca"
# The demo gateway keeps its factory identity (renewal: docs/pki.md); served fully, not only to renew
[enrol]
factory_sessions = "full"
[api]
socket = "$work/dso.sock"
events_file = "$work/events.jsonl"
port = $api_port
# The operator's certificate for lmgw-dso on this node (any host: its own file, lmgw-dso --operator FILE)
[operator]
cert_file = "$work/operator.crt"
key_file = "$work/operator.key"
TOML
cat >"$work/identity/gateway.toml" <<TOML
data_dir = "$work/data"
[dso]
url = "wss://localhost:$dso_port/"
ca_file = "ca.crt"
cert_file = "device.crt"
key_file = "device.key"
proxy = "none"
[crl]
url = "http://127.0.0.1:$crl_port/crl.der"
[identity]
renew = false
[[lm]]
name = "lm1"
profile = "simulated-lm"
transport = "tcp"
host = "127.0.0.1"
port = $lm_port
unit = 1
TOML
say "3. The DSO reference server (mutual TLS, our CA only) and the gateway dialing out to it"
"$bin/lmgw-dso" --config "$work/dso.toml" serve >"$work/dso.log" 2>&1 & pids+=($!)
wait_for "$work/dso.log" "operator API"
"$bin/lmgw-gateway" --config "$work/identity/gateway.toml" >"$work/gateway.log" 2>&1 & pids+=($!)
wait_for "$work/gateway.log" "connected to DSO"
grep -h "connected" "$work/dso.log" "$work/gateway.log" | sed 's/^/   /'

dso() { echo "\$ lmgw-dso $*"; "$bin/lmgw-dso" --config "$work/dso.toml" "$@"; }
say "4. The operator drives the LM through the channel"
dso gateways
dso call GW-DEMO-0001 lm.read '{"lm": "lm1", "points": ["relay_2", "power_2", "total_power"]}'
dso call GW-DEMO-0001 load.shed '{"lm": "lm1", "points": ["relay_2"], "duration_s": 60}'
dso call GW-DEMO-0001 lm.read '{"lm": "lm1", "points": ["relay_2", "power_2", "total_power"]}'
dso call GW-DEMO-0001 load.restore '{"lm": "lm1"}'
dso call GW-DEMO-0001 lm.write '{"lm": "lm1", "values": {"power_limit": 99999}}' || echo "   (refused before touching the bus: out of the profile's range)"

say "5. The gateway is reported stolen: revoked, disconnected at once, refused on reconnect"
dso revoke GW-DEMO-0001 --reason keyCompromise
wait_for "$work/gateway.log" "403"
grep -m1 "403" "$work/gateway.log" | sed 's/^/   /'
dso gateways
say "Demo done (logs were in $work)"
