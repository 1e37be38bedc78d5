#!/usr/bin/env bash
# Two proxies measured at the same time: both on CPU 0, each loaded by its own wrk on CPU 1
# (with the harness backend), so whatever the shared machine does in a round, it does to
# both. Prints each round's CPU per request (user+sys, from /proc) and p99 latency, and the
# median ratios A/B.
# On this machine sequential runs (bench/interleaved.sh) swing ±20% between rounds; an A/A run
# of this script stays within ±1.5%. The two share a core and its caches, so absolute figures
# are higher than a proxy's alone, and cache effects weigh more; the ratio is what it is for.
#
#   bench/ab.sh NEW_BINARY OLD_BINARY      # Gantry against an earlier build of itself
#   bench/ab.sh target/dist/gantry nginx   # Gantry against the harness's nginx
#   CONNS=50 ROUNDS=9 VARIANT=full bench/ab.sh A B
#
# A and B: a Gantry binary (run with bench/gateway.sh's VARIANT spec) or `nginx`.
# Knobs: CONNS (1000, per target), DURATION (5 s per round), ROUNDS (7), VARIANT (plain|full|default).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
[ $# = 2 ] || { sed -n '2,16p' "$0" >&2; exit 2; }
HARNESS="${HARNESS:-$ROOT/../shared/bench/gateway}"
CONNS="${CONNS:-1000}"
DURATION="${DURATION:-5}"
ROUNDS="${ROUNDS:-7}"
VARIANT="${VARIANT:-plain}"
BACKEND_PORT="${BACKEND_PORT:-18080}"
for t in wrk curl taskset; do
  command -v "$t" >/dev/null || { echo "missing: $t (apt-get install wrk)" >&2; exit 1; }
done
bench_backend
ulimit -n 20000

WORK="$(mktemp -d -t gantry-ab.XXXXXX)"
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.3; rm -rf "$WORK"' EXIT
taskset -c 1 "$BACKEND" "127.0.0.1:$BACKEND_PORT" >"$WORK/backend.log" 2>&1 &
pids+=($!)
wait_http "$BACKEND_PORT"
declare -A PID PORT
start() { # name what port
  start_proxy "$WORK/$1" "$2" "$3"
  PID[$1]=$PROXY_PID
  PORT[$1]=$3
}
start a "$1" 18091
start b "$2" 18092

ratios=()
p99s=()
for r in $(seq "$ROUNDS"); do
  a0=$(ticks "${PID[a]}"); b0=$(ticks "${PID[b]}")
  timeout $((DURATION + 30)) taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "http://127.0.0.1:${PORT[a]}/" >"$WORK/wa.txt" 2>&1 &
  wa=$!
  timeout $((DURATION + 30)) taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "http://127.0.0.1:${PORT[b]}/" >"$WORK/wb.txt" 2>&1 &
  wb=$!
  wait "$wa" "$wb" || true
  a1=$(ticks "${PID[a]}"); b1=$(ticks "${PID[b]}")
  na=$(awk '/requests in/{print $1}' "$WORK/wa.txt"); nb=$(awk '/requests in/{print $1}' "$WORK/wb.txt")
  [ -n "$na" ] && [ -n "$nb" ] || { echo "a wrk run failed" >&2; cat "$WORK/wa.txt" "$WORK/wb.txt" >&2; exit 1; }
  line=$(awk -v a=$((a1 - a0)) -v b=$((b1 - b0)) -v na="$na" -v nb="$nb" -v hz="$(getconf CLK_TCK)" 'BEGIN{
    ua = a / hz * 1e6 / na; ub = b / hz * 1e6 / nb; printf "%.2f %.2f %.3f", ua, ub, ua / ub }')
  read -r ua ub x <<<"$line"
  pa=$(to_ms "$(awk '$1=="99%"{print $2}' "$WORK/wa.txt")"); pb=$(to_ms "$(awk '$1=="99%"{print $2}' "$WORK/wb.txt")")
  px=$(awk -v a="$pa" -v b="$pb" 'BEGIN{ if (a > 0 && b > 0) printf "%.3f", a / b }')
  echo "round $r: A $ua us/req, p99 $pa ms ($na requests); B $ub us/req, p99 $pb ms ($nb requests); A/B CPU $x, p99 $px" >&2
  ratios+=("$x")
  p99s+=("$px")
done
summary() { # what values...
  local what="$1"
  shift
  printf '%s\n' "$@" | grep -v '^$' | sort -g | awk -v w="$what" '{x[NR] = $1}
    END { printf "%s median %s (range %s to %s, %d rounds)", w, x[int((NR + 1) / 2)], x[1], x[NR], NR }'
}
echo "A/B at c=$CONNS, $VARIANT: $(summary "CPU per request" "${ratios[@]}"); $(summary "p99" "${p99s[@]}"); A = $1, B = $2"
