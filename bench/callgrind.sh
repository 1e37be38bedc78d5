#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind: repeatable on a shared, noisy machine
# (bench/gateway.sh's CPU times drift by tens of percent between runs; this count does not).
# Gantry runs under valgrind on CPU 0 with the spec of a bench/gateway.sh variant; the harness
# backend and wrk share CPU 1; counting starts after a warm-up and covers one wrk run.
#
#   bench/callgrind.sh            # plain variant, c=50
#   VARIANT=full CONNS=50 bench/callgrind.sh
#
# Knobs: VARIANT (plain|full), CONNS (50), DURATION (10 s), GANTRY (binary; default: the dist
# build, built if missing), HARNESS. Output: one line, and the profile (callgrind_annotate it)
# in the printed directory. Needs valgrind and wrk (apt-get install valgrind wrk).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
HARNESS="${HARNESS:-$ROOT/../shared/bench/gateway}"
VARIANT="${VARIANT:-plain}"
CONNS="${CONNS:-50}"
DURATION="${DURATION:-10}"
BACKEND_PORT="${BACKEND_PORT:-18080}"
GANTRY_PORT="${GANTRY_PORT:-18090}"
for t in valgrind callgrind_control callgrind_annotate wrk curl taskset; do
  command -v "$t" >/dev/null || { echo "missing: $t (apt-get install valgrind wrk)" >&2; exit 1; }
done
BACKEND="$HARNESS/backend/target/release/bench-backend"
[ -x "$BACKEND" ] || (cd "$HARNESS/backend" && cargo build --release -q)
GANTRY="${GANTRY:-$ROOT/target/dist/gantry}"
[ -x "$GANTRY" ] || (cd "$ROOT" && cargo build --profile dist -q -p gantry)

OUT="$(mktemp -d -t gantry-callgrind.XXXXXX)"
BACKEND_PORT="$BACKEND_PORT" GANTRY_PORT="$GANTRY_PORT" SPECS_ONLY="$OUT" "$ROOT/bench/gateway.sh"
SPEC="$OUT/$VARIANT.toml"
[ -f "$SPEC" ] || { echo "no variant $VARIANT (plain or full)" >&2; exit 1; }

pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
taskset -c 1 "$BACKEND" "127.0.0.1:$BACKEND_PORT" >"$OUT/backend.log" 2>&1 &
pids+=($!)
taskset -c 0 valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/callgrind.%p" \
  "$GANTRY" up -f "$SPEC" >"$OUT/gantry.log" 2>&1 &
gp=$!
pids+=("$gp")
url="http://127.0.0.1:$GANTRY_PORT/"
for _ in $(seq 200); do curl -fs -o /dev/null "$url" && break; sleep 0.3; done
curl -fs -o /dev/null "$url" || { echo "gantry did not answer; see $OUT/gantry.log" >&2; exit 1; }
timeout 30 taskset -c 1 wrk -t1 -c"$CONNS" -d3s "$url" >/dev/null
callgrind_control -i on "$gp" >/dev/null 2>&1 || true  # its exit status is not reliable
callgrind_control -z "$gp" >/dev/null 2>&1 || true
timeout $((DURATION + 20)) taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" "$url" >"$OUT/wrk.txt"
callgrind_control -d "$gp" >/dev/null 2>&1 || true
callgrind_control -i off "$gp" >/dev/null 2>&1 || true
requests=$(awk '/requests in/{print $1}' "$OUT/wrk.txt")
profile=$(ls "$OUT"/callgrind.*.1 2>/dev/null | head -1)
[ -n "$profile" ] || { echo "no profile was dumped; see $OUT/gantry.log" >&2; exit 1; }
instr=$(callgrind_annotate "$profile" 2>/dev/null | awk '/PROGRAM TOTALS/ && !n {gsub(",","",$1); print $1; n=1}')
echo "gantry-$VARIANT c=$CONNS: $((instr / requests)) instructions per request ($instr over $requests requests); profile $profile"
