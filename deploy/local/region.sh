#!/usr/bin/env bash
# Runs a three-node region as three separate `ferry node` processes on this machine
# (loopback only), with development certificates, and grows it: more nodes join the
# running region by a seed. Stops what it started on Ctrl-C or exit.
#
#   deploy/local/region.sh [DATA_DIR]            nodes 1-3 (default DATA_DIR: ./ferry-local)
#   deploy/local/region.sh join ID [DATA_DIR]    node ID (4, 5, ...) joins the running region
#
# Unlike `ferry dev` (nodes in one process), this exercises the real deployment shape: one
# process and one data folder per node, configured from TOML files. Node N listens on
# 127.0.0.1:750N. Growing from 3 to 5 nodes and back, from another shell:
#
#   export FERRY_CERTS=$PWD/ferry-local/certs FERRY_SERVERS=127.0.0.1:7501,127.0.0.1:7502
#   deploy/local/region.sh join 4 &  deploy/local/region.sh join 5 &
#   ferry ctl node list                 # five nodes, five metadata voters
#   ferry ctl rebalance                 # replicas and preferred leaders spread over all five
#   ferry ctl node drain 5 && ferry ctl node remove 5 && kill %2
#   ferry ctl node drain 4 && ferry ctl node remove 4 && kill %1
set -euo pipefail
FERRY=${FERRY:-target/release/ferry}
JOIN=
if [ "${1:-}" = join ]; then
  JOIN=${2:?usage: region.sh join ID [DATA_DIR]}
  case $JOIN in *[!0-9]* | '' | 0) echo "region.sh: node id must be a number from 1" >&2; exit 2 ;; esac
  shift 2
fi
DATA=${1:-ferry-local}
mkdir -p "$DATA"
DATA=$(cd "$DATA" && pwd)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
tls() {
  printf '[tls]\nca = "%s"\ncert = "%s"\nkey = "%s"\n' \
    "$DATA/certs/ca.pem" "$DATA/certs/node-$1.pem" "$DATA/certs/node-$1.key"
}
if [ -n "$JOIN" ]; then
  [ -f "$DATA/certs/ca.pem" ] || { echo "region.sh: start the region first (no $DATA/certs)" >&2; exit 1; }
  "$FERRY" certs issue --dir "$DATA/certs" --nodes "$JOIN"
  {
    printf 'id = %s\ndata_dir = "%s"\naddr = "127.0.0.1:%s"\n' "$JOIN" "$DATA/node-$JOIN" $((7500 + JOIN))
    printf 'seeds = ["127.0.0.1:7501", "127.0.0.1:7502", "127.0.0.1:7503"]\n'
    tls "$JOIN"
  } > "$DATA/node-$JOIN.toml"
  "$FERRY" node --config "$DATA/node-$JOIN.toml" &
  pids+=($!)
  echo "node $JOIN joining the region at 127.0.0.1:$((7500 + JOIN))"
  wait
  exit
fi
[ -f "$DATA/certs/ca.pem" ] || "$FERRY" certs init --out "$DATA/certs" --nodes 1,2,3 --clients ctl,bench
for id in 1 2 3; do
  {
    printf 'id = %s\ndata_dir = "%s"\n' "$id" "$DATA/node-$id"
    for peer in 1 2 3; do
      printf '[[peers]]\nid = %s\naddr = "127.0.0.1:%s"\n' "$peer" $((7500 + peer))
    done
    tls "$id"
  } > "$DATA/node-$id.toml"
  "$FERRY" node --config "$DATA/node-$id.toml" &
  pids+=($!)
done
echo "region running; from another shell:"
echo "  export FERRY_CERTS=$DATA/certs FERRY_SERVERS=127.0.0.1:7501,127.0.0.1:7502,127.0.0.1:7503"
echo "  deploy/local/region.sh join 4 $DATA     # grow it"
wait
