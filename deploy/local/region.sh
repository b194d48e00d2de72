#!/usr/bin/env bash
# Runs a three-node region as three separate `ferry node` processes on this machine
# (loopback only), with development certificates. Stops them all on Ctrl-C or exit.
#
#   deploy/local/region.sh [DATA_DIR]      (default: ./ferry-local)
#
# Unlike `ferry dev` (three nodes in one process), this exercises the real deployment shape:
# one process and one data folder per node, configured from TOML files.
set -euo pipefail
FERRY=${FERRY:-target/release/ferry}
DATA=${1:-ferry-local}
mkdir -p "$DATA"
DATA=$(cd "$DATA" && pwd)
[ -f "$DATA/certs/ca.pem" ] || "$FERRY" certs init --out "$DATA/certs" --nodes 1,2,3 --clients ctl,bench
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
for id in 1 2 3; do
  cat > "$DATA/node-$id.toml" <<TOML
id = $id
data_dir = "$DATA/node-$id"
[[peers]]
id = 1
addr = "127.0.0.1:7501"
[[peers]]
id = 2
addr = "127.0.0.1:7502"
[[peers]]
id = 3
addr = "127.0.0.1:7503"
[tls]
ca = "$DATA/certs/ca.pem"
cert = "$DATA/certs/node-$id.pem"
key = "$DATA/certs/node-$id.key"
TOML
  "$FERRY" node --config "$DATA/node-$id.toml" &
  pids+=($!)
done
echo "region running; from another shell:"
echo "  export FERRY_CERTS=$DATA/certs FERRY_SERVERS=127.0.0.1:7501,127.0.0.1:7502,127.0.0.1:7503"
wait
