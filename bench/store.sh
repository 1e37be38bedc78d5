#!/usr/bin/env bash
# The store: durable writes per second at 64 in flight and watch latency p50/p99 (put -> a
# watcher of the bucket, at 1,000 puts/s), for the embedded store, the NATS backend and raw
# async-nats KV on the same nats-server (the reference), interleaved in one run; medians.
#
#   bench/store.sh              # NATS_URL=nats://127.0.0.1:4222 SECONDS_EACH=3 CONCURRENCY=64 ROUNDS=3
#
# Goals (issue 13): the NATS backend within 20% of raw KV; the embedded store >= 30,000 durable
# (fsynced) writes/s. The embedded store's data directory is made under DATA_DIR (default: the
# repository's target/, a real disk: fsync on tmpfs would flatter it).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
NATS_URL="${NATS_URL:-nats://127.0.0.1:4222}"
SECONDS_EACH="${SECONDS_EACH:-3}"
CONCURRENCY="${CONCURRENCY:-64}"
ROUNDS="${ROUNDS:-3}"
DATA_DIR="${DATA_DIR:-$ROOT/target}"
cd "$ROOT"
cargo build --profile dist -q -p gantry-store --example store_bench
mkdir -p "$DATA_DIR"
"$ROOT/target/dist/examples/store_bench" "$NATS_URL" "$SECONDS_EACH" "$CONCURRENCY" "$ROUNDS" "$DATA_DIR"
