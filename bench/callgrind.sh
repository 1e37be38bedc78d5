#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind: repeatable on a shared, noisy machine
# (bench/gateway.sh's CPU times drift by tens of percent between runs; this count does not).
# Gantry runs under valgrind on CPU 0 with the spec of a bench/gateway.sh variant; the harness
# backend and wrk share CPU 1; counting starts after a warm-up and covers one wrk run.
#
#   bench/callgrind.sh            # plain variant, c=50
#   VARIANT=full CONNS=50 bench/callgrind.sh
#   TARGET=nginx CONNS=1000 CACHE_SIM=1 bench/callgrind.sh   # the harness's nginx, same count
#
# Knobs: VARIANT (plain|full), CONNS (50), DURATION (10 s), GANTRY (binary; default: the dist
# build, built if missing), HARNESS. Output: one line, and the profile (callgrind_annotate it)
# in the printed directory. Needs valgrind and wrk (apt-get install valgrind wrk).
# CACHE_SIM=1 also simulates the caches and prints data-cache misses per request: at c=1000 the
# CPU per request is set by cache misses more than by instructions. The simulated last level is
# this machine's per-core L2 (read from /sys; CACHE_LL="size,ways,line" to set it), so DLmr and
# DLmw count what misses L2 and goes to the shared L3 or memory: the expensive misses.
# TARGET=nginx counts the harness's nginx configuration (one process, master_process off).
# LOCKS=1 also counts locked (atomic read-modify-write) instructions per request, by function and
# by call site (bench/locked.py): each waits for earlier stores to drain, and at c=1000 often
# for a cold line; nginx, single-threaded, makes almost none.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
HARNESS="${HARNESS:-$ROOT/../shared/bench/gateway}"
VARIANT="${VARIANT:-plain}"
CONNS="${CONNS:-50}"
DURATION="${DURATION:-10}"
CACHE_SIM="${CACHE_SIM:-0}"
TARGET="${TARGET:-gantry}"
sim=()
if [ "$CACHE_SIM" = 1 ]; then
  if [ -z "${CACHE_LL:-}" ]; then
    l2=/sys/devices/system/cpu/cpu0/cache/index2
    kb=$(tr -d K <"$l2/size" 2>/dev/null || echo 2048)
    CACHE_LL="$((kb * 1024)),$(cat "$l2/ways_of_associativity" 2>/dev/null || echo 16),$(cat "$l2/coherency_line_size" 2>/dev/null || echo 64)"
  fi
  sim=(--cache-sim=yes "--LL=$CACHE_LL")
fi
LOCKS="${LOCKS:-0}"
[ "$LOCKS" = 1 ] && sim+=(--dump-instr=yes)
BACKEND_PORT="${BACKEND_PORT:-18080}"
GANTRY_PORT="${GANTRY_PORT:-18090}"
for t in valgrind callgrind_control callgrind_annotate wrk curl taskset; do
  command -v "$t" >/dev/null || { echo "missing: $t (apt-get install valgrind wrk)" >&2; exit 1; }
done
bench_backend
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
case "$TARGET" in
  gantry) cmd=("$GANTRY" up -f "$SPEC") ;;
  nginx)
    # The harness's nginx configuration, in one process.
    nginx_prefix "$OUT/nginx" "$GANTRY_PORT" "$BACKEND_PORT" "master_process off;"
    cmd=(nginx -p "$OUT/nginx/" -e logs/error.log -c nginx.conf)
    VARIANT=plain
    ;;
  *) echo "TARGET is gantry or nginx" >&2; exit 1 ;;
esac
ulimit -n 20000 2>/dev/null || true
taskset -c 0 valgrind --tool=callgrind "${sim[@]}" --instr-atstart=no --callgrind-out-file="$OUT/callgrind.%p" \
  "${cmd[@]}" >"$OUT/gantry.log" 2>&1 &
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
echo "$TARGET-$VARIANT c=$CONNS: $((instr / requests)) instructions per request ($instr over $requests requests); profile $profile"
if [ "$CACHE_SIM" = 1 ]; then
  # The totals line gives each event (with its share in parentheses) in "Events shown" order.
  callgrind_annotate "$profile" 2>/dev/null | awk -v n="$requests" '
    /^Events shown/ && !e { for (i = 3; i <= NF; i++) name[++k] = $i; e = 1 }
    /PROGRAM TOTALS/ && !t { j = 0; for (i = 1; i <= NF; i++) if ($i ~ /^[0-9,]+$/) { gsub(",", "", $i); v[++j] = $i }; t = 1 }
    END { for (i = 1; i <= k; i++) if (name[i] ~ /^(D1mr|D1mw|DLmr|DLmw)$/) printf "%s %.1f/req  ", name[i], v[i] / n; print "" }'
fi
if [ "$LOCKS" = 1 ]; then
  python3 "$ROOT/bench/locked.py" "$profile" "$requests" "${TOP:-40}"
fi
