#!/usr/bin/env bash
# Registration (or deregistration) -> routable at the gateway, p50/p99, with a large system
# loaded (1,000 services x 3 instances, 200 routes by default), against the peer a registry on
# NATS would have: a JetStream KV put reaching a watcher of the bucket (the nats-server this
# machine runs, measured by nats-py in the same run). Prints both and their p99 ratio.
# Then throughput: durable self-registrations per second with 64 in flight (each fsynced on
# the embedded store, on DATA_DIR: a real disk), the same on the NATS backend, and plain NATS
# KV puts at 64 in flight (acknowledged before fsync) in the same run. Last, a restart: the
# registry reopened on STORED stored registrations (goal: 100,000 back in <= 1 s).
#
#   bench/registry.sh                 # SERVICES=1000 ROUTES=200 CHANGES=2000 TOTAL=20000 STORED=100000 NATS_URL=...
#
# Gantry's figure is in-process (the registry calls the gateway before the change returns, and
# each change is checked against what the request path sees); the NATS figure includes a
# Python client's overhead, so the ratio flatters NATS a little, never Gantry.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SERVICES="${SERVICES:-1000}"
ROUTES="${ROUTES:-200}"
CHANGES="${CHANGES:-2000}"
TOTAL="${TOTAL:-20000}"
STORED="${STORED:-100000}"
NATS_URL="${NATS_URL:-nats://127.0.0.1:4222}"
cd "$ROOT"
cargo build --profile dist -q -p gantry --example registry_routable
python3 -c "import nats" 2>/dev/null || python3 -m pip install --quiet nats-py
out="$(NATS_URL="$NATS_URL" DATA_DIR="${DATA_DIR:-$ROOT/target}" "$ROOT/target/dist/examples/registry_routable" "$SERVICES" "$ROUTES" "$CHANGES" "$TOTAL" "$STORED")"
echo "$out"
peer="$(timeout 120 python3 "$ROOT/bench/nats_kv_watch.py" "$NATS_URL" "$CHANGES" || echo "nats: unavailable")"
echo "$peer"
p99() { sed -n "s/.*$1.*p99=\([0-9.]*\)us.*/\1/p" <<<"$2" | head -1; }
g="$(p99 'supervised register' "$out")"
n="$(p99 'nats kv' "$peer")"
if [ -n "$g" ] && [ -n "$n" ]; then
  awk -v g="$g" -v n="$n" 'BEGIN { printf "p99 register -> routable / NATS KV put -> watcher: %.3f (goal: Gantry p99 <= 1000us)\n", g / n }'
fi
