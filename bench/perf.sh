#!/usr/bin/env bash
# Where the CPU time of a proxied request goes, in microseconds per request, from a sampled
# profile (perf record -e cpu-clock: works in a VM without hardware counters) of Gantry or the
# harness's nginx under one wrk run. Complements bench/callgrind.sh, which counts instructions:
# at c=1000 time follows cache misses and locked instructions more than instruction counts.
#
#   bench/perf.sh                          # Gantry plain, c=1000
#   TARGET=nginx CONNS=1000 bench/perf.sh  # the harness's nginx, same load
#   VARIANT=full CONNS=50 TOP=40 bench/perf.sh
#
# Knobs: TARGET (gantry|nginx), VARIANT (plain|full), CONNS (1000), DURATION (10 s), WARMUP
# (3 s), TOP (30 symbols), GANTRY (binary; default: the dist build), HARNESS.
# Output: total, user and kernel µs/req, then the TOP symbols by µs/req; the profile stays in
# the printed directory (perf report -i DIR/perf.data). Needs linux-perf and wrk.
# Compare shares between targets rather than totals: the totals move with the machine's speed
# from run to run (bench/ab.sh gives the ratio), and under perf a multi-threaded target may
# not saturate its core (fewer samples than nginx in the same time).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
HARNESS="${HARNESS:-$ROOT/../shared/bench/gateway}"
TARGET="${TARGET:-gantry}"
VARIANT="${VARIANT:-plain}"
CONNS="${CONNS:-1000}"
DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-3}"
TOP="${TOP:-30}"
BACKEND_PORT="${BACKEND_PORT:-18080}"
PORT="${PORT:-18090}"
for t in perf wrk curl taskset; do
  command -v "$t" >/dev/null || { echo "missing: $t (apt-get install linux-perf wrk)" >&2; exit 1; }
done
bench_backend
GANTRY="${GANTRY:-$ROOT/target/dist/gantry}"
[ -x "$GANTRY" ] || (cd "$ROOT" && cargo build --profile dist -q -p gantry)
ulimit -n 20000

OUT="$(mktemp -d -t gantry-perf.XXXXXX)"
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
taskset -c 1 "$BACKEND" "127.0.0.1:$BACKEND_PORT" >"$OUT/backend.log" 2>&1 &
pids+=($!)
wait_http "$BACKEND_PORT"
case "$TARGET" in
  gantry) start_proxy "$OUT/target" "$GANTRY" "$PORT" ;;
  nginx) start_proxy "$OUT/target" nginx "$PORT" ;;
  *) echo "TARGET is gantry or nginx" >&2; exit 1 ;;
esac
pid=$PROXY_PID
url="http://127.0.0.1:$PORT/"
[ "$WARMUP" = 0 ] || timeout $((WARMUP + 20)) taskset -c 1 wrk -t1 -c"$CONNS" -d"${WARMUP}s" "$url" >/dev/null 2>&1 || true

perf record -q -e cpu-clock -F 10000 -p "$pid" -o "$OUT/perf.data" -- sleep $((DURATION + 1)) 2>"$OUT/perf.log" &
perf_pid=$!
sleep 0.5
timeout $((DURATION + 30)) taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "$url" >"$OUT/wrk.txt" 2>&1 || true
wait "$perf_pid" || true
reqs=$(awk '/requests in/{print $1}' "$OUT/wrk.txt")
[ -n "$reqs" ] && [ "$reqs" -gt 0 ] || { echo "wrk made no requests:" >&2; cat "$OUT/wrk.txt" >&2; exit 1; }

# Samples outside the wrk run are few: the target idles then.
perf report -i "$OUT/perf.data" --no-children --sort dso,sym --stdio -q 2>/dev/null >"$OUT/report.txt"
# cpu-clock periods are nanoseconds of CPU time.
total=$(perf script -i "$OUT/perf.data" -F period 2>/dev/null | awk '{s+=$1} END{print s}')
kernel=$(perf script -i "$OUT/perf.data" -F ip,sym,dso 2>/dev/null | awk '/kernel/{k++} {n++} END{print k+0, n+0}')
read -r ksamples nsamples <<<"$kernel"
awk -v n="$nsamples" -v k="$ksamples" -v t="$total" -v r="$reqs" -v c="$CONNS" -v tg="$TARGET" 'BEGIN{
  per = (t / 1000) / r   # period in ns -> µs per request
  printf "%s c=%s: %.2f us/req (user %.2f, kernel %.2f), %d requests, %d samples\n", tg, c, per, per*(n-k)/n, per*k/n, r, n }'
awk -v t="$total" -v r="$reqs" -v top="$TOP" 'NF >= 3 && $1 ~ /%$/ {
  p = $1; sub(/%$/, "", p); $1 = ""; if (shown++ < top) printf "%7.3f us  %s\n", p/100 * (t/1000) / r, $0 }' "$OUT/report.txt"
echo "profile: $OUT/perf.data"
