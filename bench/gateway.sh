#!/usr/bin/env bash
# Gateway benchmark: Gantry next to nginx, HAProxy, Caddy and Pingora, same backend, same wrk
# load, proxy pinned alone on one core. Drives the shared harness (../shared/bench/gateway/run.sh)
# with Gantry as its EXTRA target, once per variant:
#   plain  one prefix route to the backend (static endpoint), one gateway worker, no access log,
#          no headers added (request_id, trace_context, forwarded_headers off: like the harness's
#          nginx); metrics stay on
#   full   the full request path: 24 routes to match through (hosts, methods, header and query
#          conditions, regex paths), P2C-EWMA, circuit breaker and outlier detection, retries
#          with a budget, metrics, traceparent, X-Request-Id, X-Forwarded-*
#   default what a user gets without tuning: one prefix route and every default (P2C-EWMA,
#          breaker, outlier detection, retries, request id, trace context, forwarding headers),
#          one gateway worker (the peers get one core too); not run unless named in VARIANTS
# in ROUNDS rounds (each round: the harness once per variant), and prints the harness tables
# plus the ratios the project tracks, per round and as medians over the rounds.
#
#   bench/gateway.sh                              # both variants, all peers, c=50 and c=1000
#   VARIANTS=plain PEERS=nginx,haproxy ROUNDS=5 bench/gateway.sh
#   CONNS_LIST=50 DURATION=5 bench/gateway.sh     # quicker
#
# Knobs: VARIANTS (plain,full; or default), PEERS (comma list of harness targets besides direct; default
# nginx,haproxy,caddy,pingora), ROUNDS (3), HARNESS (path), and every knob of the harness (RUNS,
# default 1 per round here; DURATION, CONNS_LIST, WARMUP, ...). The machine is shared and its
# speed drifts: the ratios are taken within a round, and the "other CPU %" column says whether a
# run was disturbed from inside the machine.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
HARNESS="${HARNESS:-$ROOT/../shared/bench/gateway}"
VARIANTS="${VARIANTS:-plain,full}"
PEERS="${PEERS:-nginx,haproxy,caddy,pingora}"
BACKEND_PORT="${BACKEND_PORT:-18080}"
GANTRY_PORT="${GANTRY_PORT:-18090}"
export BACKEND_PORT

[ -x "$HARNESS/run.sh" ] || { echo "harness not found at $HARNESS (set HARNESS)" >&2; exit 1; }

write_spec() { # variant file
  local v="$1" f="$2"
  if [ "$v" = default ]; then
    cat >"$f" <<EOF
[gateway]
listen = "127.0.0.1:$GANTRY_PORT"
workers = 1

[admin]
listen = "127.0.0.1:0"

[identity]
listen = "127.0.0.1:0"

[store]
data_dir = "$WORK/data-$v"

[services.backend]
endpoints = ["127.0.0.1:$BACKEND_PORT"]
[[services.backend.routes]]
path_prefix = "/"
EOF
    return
  fi
  # plain: what a plain reverse proxy does (the harness's nginx adds no header either); full:
  # request ids, W3C trace context and X-Forwarded-* on top (the issue's "tracing header").
  local added=true
  [ "$v" = plain ] && added=false
  cat >"$f" <<EOF
[gateway]
listen = "127.0.0.1:$GANTRY_PORT"
workers = 1
access_log = false
request_id = $added
trace_context = $added
forwarded_headers = $added

[admin]
listen = "127.0.0.1:0"

[identity]
listen = "127.0.0.1:0"

[store]
data_dir = "$WORK/data-$v"

[services.backend]
endpoints = ["127.0.0.1:$BACKEND_PORT"]
EOF
  if [ "$v" = plain ]; then
    cat >>"$f" <<EOF
upstream = { load_balancer = "round_robin" }
[[services.backend.routes]]
path_prefix = "/"
retries = { attempts = 0 }
EOF
  else
    # 23 routes that do not match wrk's requests, then the one that does.
    for i in $(seq 1 8); do
      cat >>"$f" <<EOF
[[services.backend.routes]]
host = "svc$i.example.com"
path_prefix = "/api/v$i"
[[services.backend.routes]]
path_regex = "^/reports/[0-9]+/v$i$"
methods = ["GET", "HEAD"]
[[services.backend.routes]]
path_prefix = "/admin$i"
headers = [{ name = "x-admin", value = "yes" }]
query = [{ name = "token" }]
EOF
    done
    cat >>"$f" <<EOF
[[services.backend.routes]]
hosts = ["127.0.0.1", "*.example.net"]
path_prefix = "/"
methods = ["GET", "HEAD", "POST"]
headers = [{ name = "host" }]
EOF
  fi
}

# SPECS_ONLY=DIR: write the variants' specs (DIR/{plain,full,default}.toml) and stop; the
# instruction-count profile (bench/callgrind.sh) runs Gantry on them.
if [ -n "${SPECS_ONLY:-}" ]; then
  mkdir -p "$SPECS_ONLY"
  WORK="$(cd "$SPECS_ONLY" && pwd)"
  write_spec plain "$WORK/plain.toml"
  write_spec full "$WORK/full.toml"
  write_spec default "$WORK/default.toml"
  exit 0
fi

missing=()
for t in wrk curl taskset nginx haproxy caddy; do command -v "$t" >/dev/null || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing benchmark tools: nginx-light haproxy caddy wrk" >&2
    apt-get update -qq && apt-get install -y -qq nginx-light haproxy caddy wrk curl procps iproute2 util-linux >/dev/null
  else
    echo "missing: ${missing[*]} (apt-get install nginx-light haproxy caddy wrk)" >&2; exit 1
  fi
fi
bench_backend
if [[ ",$PEERS," == *",pingora,"* ]] && [ ! -x "$HARNESS/pingora-peer/target/release/pingora-peer" ]; then
  command -v cmake >/dev/null || { [ "$(id -u)" = 0 ] && apt-get install -y -qq cmake >/dev/null; }
  echo "building the Pingora peer (several minutes on 2 cores)..." >&2
  (cd "$HARNESS/pingora-peer" && cargo build --release -q)
fi
# The shipping build (`[profile.dist]`: fat LTO, one codegen unit).
(cd "$ROOT" && cargo build --profile dist -q -p gantry)
GANTRY="$ROOT/target/dist/gantry"

WORK="$(mktemp -d -t gantry-bench.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

idle_rss() { # spec -> MiB of a freshly started gantry after 2 s
  "$GANTRY" up -f "$1" >/dev/null 2>&1 & local pid=$!
  sleep 2
  local kb; kb=$(awk '/^VmRSS:/{print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
  kill -INT "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
  awk -v k="$kb" 'BEGIN{printf "%.1f", k/1024}'
}

# Rounds: each round runs the harness once per variant (the first variant with every peer, the
# others with nginx only), so that the ratios compare figures measured minutes apart, not half an
# hour apart on a machine whose speed drifts. The ratios are taken per round; their medians are
# the result.
ROUNDS="${ROUNDS:-3}"
export RUNS="${RUNS:-1}"
declare -A SUMMARY
IFS=, read -ra VS <<<"$VARIANTS"
for v in "${VS[@]}"; do
  spec="$WORK/$v.toml"
  write_spec "$v" "$spec"
  "$GANTRY" validate -f "$spec" >/dev/null
  rss=$(idle_rss "$spec")
  echo "== gantry-$v: idle RSS ${rss} MiB" >&2
  echo "$rss" >"$WORK/idle-$v"
done
for r in $(seq "$ROUNDS"); do
  for i in "${!VS[@]}"; do
    v="${VS[$i]}"
    peers="$PEERS"; [ "$i" -gt 0 ] && peers="nginx"
    echo "== round $r/$ROUNDS: gantry-$v against direct,$peers" >&2
    before=$(ls -1 "$HARNESS/results" 2>/dev/null | sort | tail -1 || true)
    EXTRA_NAME="gantry-$v" EXTRA_PORT="$GANTRY_PORT" EXTRA_CMD="$GANTRY up -f $WORK/$v.toml" \
      TARGETS="direct,$peers,gantry-$v" "$HARNESS/run.sh" >&2
    after=$(ls -1 "$HARNESS/results" | sort | tail -1)
    [ "$after" != "$before" ] || { echo "harness produced no results" >&2; exit 1; }
    SUMMARY[$v,$r]="$HARNESS/results/$after/summary.md"
  done
done

# Columns of the harness tables: | target | req/s | p50 | p99 | RSS | CPU us/req | vs direct | other |
field() { # summary conns target column(1-based after target) -> value
  awk -v c="## c=$2" -v t="$3" -v col="$4" '
    $0==c {on=1; next} /^## c=/ {on=0}
    on && $0 ~ "^\\| "t" \\|" { split($0, a, "|"); v=a[col+2]; gsub(/^ +| +$/, "", v); split(v, w, " "); print w[1]; exit }' "$1"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a>0 && b>0) printf "%.3f", a/b; else print "" }'; }

echo
for v in "${VS[@]}"; do
  echo "### gantry-$v"
  for r in $(seq "$ROUNDS"); do
    echo
    echo "#### round $r"
    sed -n '/^## c=/,$p' "${SUMMARY[$v,$r]}"
  done
  echo
  echo "idle RSS: $(cat "$WORK/idle-$v") MiB"
  for conns in ${CONNS_LIST:-50 1000}; do
    cpu=(); p99=(); rss=(); gcpu=(); ncpu=(); grss=(); nrss=()
    for r in $(seq "$ROUNDS"); do
      f="${SUMMARY[$v,$r]}"
      g_cpu=$(field "$f" "$conns" "gantry-$v" 5); n_cpu=$(field "$f" "$conns" nginx 5)
      g_p99=$(field "$f" "$conns" "gantry-$v" 3); n_p99=$(field "$f" "$conns" nginx 3)
      g_rss=$(field "$f" "$conns" "gantry-$v" 4); n_rss=$(field "$f" "$conns" nginx 4)
      cpu+=("$(ratio "$g_cpu" "$n_cpu")"); p99+=("$(ratio "$g_p99" "$n_p99")")
      rss+=("$(ratio "$g_rss" "$n_rss")")
      gcpu+=("$g_cpu"); ncpu+=("$n_cpu"); grss+=("$g_rss"); nrss+=("$n_rss")
    done
    printf 'c=%s gantry-%s / nginx, median of %s rounds: CPU/req %s (rounds: %s; gantry %s vs nginx %s us), p99 %s (rounds: %s), RSS %s (%s vs %s MiB)\n' \
      "$conns" "$v" "$ROUNDS" "$(median "${cpu[@]}")" "${cpu[*]}" "$(median "${gcpu[@]}")" "$(median "${ncpu[@]}")" \
      "$(median "${p99[@]}")" "${p99[*]}" "$(median "${rss[@]}")" "$(median "${grss[@]}")" "$(median "${nrss[@]}")"
  done
  echo
done
if [[ ",$VARIANTS," == *",plain,"* && ",$VARIANTS," == *",full,"* ]]; then
  for conns in ${CONNS_LIST:-50 1000}; do
    fp=()
    for r in $(seq "$ROUNDS"); do
      fp+=("$(ratio "$(field "${SUMMARY[full,$r]}" "$conns" gantry-full 5)" "$(field "${SUMMARY[plain,$r]}" "$conns" gantry-plain 5)")")
    done
    printf 'c=%s: full path / plain CPU per request, median of %s rounds: %s (rounds: %s)\n' "$conns" "$ROUNDS" "$(median "${fp[@]}")" "${fp[*]}"
  done
fi
