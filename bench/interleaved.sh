#!/usr/bin/env bash
# CPU per request of Gantry against nginx, measured in interleaved runs: every target runs all
# the time (each on CPU 0, loaded one at a time), and each round measures them back to back,
# in an order that alternates between rounds, so the ratios compare runs seconds apart.
# bench/gateway.sh (the shared harness) measures the targets one after another, minutes apart,
# and on this shared machine its ratios swing by ±20% between rounds; this script's do not.
# It complements the harness, and does not replace it: no peers other than nginx, no RSS table.
#
#   bench/interleaved.sh                         # plain and full, c=50 and c=1000, 5 rounds
#   ROUNDS=9 CONNS_LIST=1000 VARIANTS=plain bench/interleaved.sh
#   BASE=/tmp/gantry-before bench/interleaved.sh  # also a baseline build: gantry/base ratios
#
# Knobs: VARIANTS (plain,full: bench/gateway.sh's specs), CONNS_LIST ("50 1000"), ROUNDS (5),
# DURATION (8 s per run), WARMUP (2 s; 0: none, e.g. for many short rounds), GANTRY (binary;
# default: the dist build), HARNESS, BASE (a second Gantry binary, run beside the first with
# the same specs, to A/B a change: also prints gantry/base), BASE_ENV (environment assignments
# for the baseline, e.g. "RUST_LOG=info").
# Output: one line per run, then per variant and connection count the median over rounds of
# gantry/nginx CPU per request (user+sys, from /proc) and of p99 latency.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
HARNESS="${HARNESS:-$ROOT/../shared/bench/gateway}"
VARIANTS="${VARIANTS:-plain,full}"
CONNS_LIST="${CONNS_LIST:-50 1000}"
ROUNDS="${ROUNDS:-5}"
DURATION="${DURATION:-8}"
WARMUP="${WARMUP:-2}"
BACKEND_PORT="${BACKEND_PORT:-18080}"
NGINX_PORT="${NGINX_PORT:-18081}"
PORT_BASE="${PORT_BASE:-18090}"
for t in wrk curl taskset nginx; do
  command -v "$t" >/dev/null || { echo "missing: $t (apt-get install nginx-light wrk)" >&2; exit 1; }
done
bench_backend
GANTRY="${GANTRY:-$ROOT/target/dist/gantry}"
[ -x "$GANTRY" ] || (cd "$ROOT" && cargo build --profile dist -q -p gantry)
ulimit -n 20000

WORK="$(mktemp -d -t gantry-interleaved.XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  rm -rf "$WORK"
}
trap cleanup EXIT

taskset -c 1 "$BACKEND" "127.0.0.1:$BACKEND_PORT" >"$WORK/backend.log" 2>&1 &
pids+=($!)
wait_http "$BACKEND_PORT"

declare -A PID PORT
start_proxy "$WORK/nginx" nginx "$NGINX_PORT"
PID[nginx]=$PROXY_PID
PORT[nginx]=$NGINX_PORT

IFS=, read -ra VS <<<"$VARIANTS"
names=(nginx)
port=$PORT_BASE
start_gantry() { # name binary variant [env assignments...]: on the next port, with that variant's spec
  local name="$1" bin="$2"
  VARIANT="$3"
  shift 3
  start_proxy "$WORK/$name" "$bin" "$port" "$@"
  PID[$name]=$PROXY_PID
  PORT[$name]=$port
  names+=("$name")
  port=$((port + 1))
}
for v in "${VS[@]}"; do
  start_gantry "gantry-$v" "$GANTRY" "$v"
  if [ -n "${BASE:-}" ]; then
    # shellcheck disable=SC2086 # BASE_ENV is a list of assignments
    start_gantry "base-$v" "$BASE" "$v" ${BASE_ENV:-}
  fi
done

declare -A CPU P99
hz=$(getconf CLK_TCK)
for r in $(seq "$ROUNDS"); do
  order=("${names[@]}")
  if [ $((r % 2)) = 0 ]; then # reversed every other round: drift cancels out in the medians
    order=()
    for ((i = ${#names[@]} - 1; i >= 0; i--)); do order+=("${names[$i]}"); done
  fi
  for conns in $CONNS_LIST; do
    for n in "${order[@]}"; do
      url="http://127.0.0.1:${PORT[$n]}/"
      if [ "$WARMUP" != 0 ]; then
        timeout $((WARMUP + 20)) taskset -c 1 wrk -t1 -c"$conns" -d"${WARMUP}s" "$url" >/dev/null 2>&1 || true
      fi
      t0=$(ticks "${PID[$n]}")
      timeout $((DURATION + 30)) taskset -c 1 wrk -t1 -c"$conns" -d"${DURATION}s" --latency "$url" >"$WORK/wrk.txt" 2>&1 || true
      t1=$(ticks "${PID[$n]}")
      reqs=$(awk '/requests in/{print $1}' "$WORK/wrk.txt")
      errs=$(awk '/Non-2xx/{s+=$NF} /Socket errors/{gsub(/[^0-9 ]/," "); s+=$1+$2+$3+$4} END{print s+0}' "$WORK/wrk.txt")
      CPU[$n,$conns,$r]=$(awk -v d=$((t1 - t0)) -v hz="$hz" -v n="${reqs:-0}" 'BEGIN{ if (n>0) printf "%.2f", d/hz*1e6/n; else print "" }')
      P99[$n,$conns,$r]=$(to_ms "$(awk '$1=="99%"{print $2}' "$WORK/wrk.txt")")
      echo "round $r c=$conns $n: ${CPU[$n,$conns,$r]} us/req, p99 ${P99[$n,$conns,$r]} ms, $reqs requests$([ "$errs" -gt 0 ] && echo ", $errs errors")" >&2
    done
  done
done

echo "# interleaved: gantry / nginx, medians of $ROUNDS rounds (wrk -t1 -d${DURATION}s per run; $(date -u +%FT%TZ))"
for v in "${VS[@]}"; do
  for conns in $CONNS_LIST; do
    cr=(); pr=(); gc=(); nc=()
    for r in $(seq "$ROUNDS"); do
      g=${CPU[gantry-$v,$conns,$r]}; n=${CPU[nginx,$conns,$r]}
      cr+=("$(awk -v a="$g" -v b="$n" 'BEGIN{ if (a>0 && b>0) printf "%.3f", a/b }')")
      pr+=("$(awk -v a="${P99[gantry-$v,$conns,$r]}" -v b="${P99[nginx,$conns,$r]}" 'BEGIN{ if (a>0 && b>0) printf "%.3f", a/b }')")
      gc+=("$g"); nc+=("$n")
    done
    printf 'gantry-%s c=%s: CPU/req %s (rounds: %s; gantry %s vs nginx %s us), p99 %s (rounds: %s)\n' \
      "$v" "$conns" "$(median "${cr[@]}")" "${cr[*]}" "$(median "${gc[@]}")" "$(median "${nc[@]}")" \
      "$(median "${pr[@]}")" "${pr[*]}"
    if [ -n "${BASE:-}" ]; then
      br=(); bn=()
      for r in $(seq "$ROUNDS"); do
        br+=("$(awk -v a="${CPU[gantry-$v,$conns,$r]}" -v b="${CPU[base-$v,$conns,$r]}" 'BEGIN{ if (a>0 && b>0) printf "%.3f", a/b }')")
        bn+=("$(awk -v a="${CPU[base-$v,$conns,$r]}" -v b="${CPU[nginx,$conns,$r]}" 'BEGIN{ if (a>0 && b>0) printf "%.3f", a/b }')")
      done
      printf '  base-%s c=%s: CPU/req vs nginx %s; gantry/base %s (rounds: %s)\n' \
        "$v" "$conns" "$(median "${bn[@]}")" "$(median "${br[@]}")" "${br[*]}"
    fi
  done
done
