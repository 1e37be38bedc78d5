#!/usr/bin/env bash
# What JWT verification costs the gateway: CPU per request of a route with `auth = "required"`
# against the same route with no authentication, in the same Gantry process, measured in
# interleaved runs (the runs of a round are seconds apart, so the machine's drift cancels out in
# the ratio). One Gantry per signing algorithm (EdDSA, ES256, RS256), each proxying to the
# harness backend, pinned on CPU 0 with wrk on CPU 1 (bench/interleaved.sh's setup), on
# bench/gateway.sh's plain settings (one worker, no added headers).
#
# Per algorithm, three runs a round:
#   none      GET /open/       no authentication
#   cached    GET /auth/       one valid token, sent again and again: verified once per gateway
#                              thread, then found in the thread's cache of verified tokens
#   uncached  GET /auth/       6000 distinct valid tokens in turn (more than the cache holds):
#                              every request verifies a signature
#
#   bench/auth.sh                          # EdDSA, ES256, RS256; c=50; 5 rounds
#   ALGS=EdDSA ROUNDS=9 CONNS_LIST="50 1000" bench/auth.sh
#
# Knobs: ALGS, CONNS_LIST ("50"), ROUNDS (5), DURATION (6 s), WARMUP (1 s), GANTRY (binary;
# default the dist build), HARNESS. Output: per run one line, then per algorithm the medians of
# cached/none and uncached/none CPU per request (the issue's goal: cached EdDSA at most 1.10).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
HARNESS="${HARNESS:-$ROOT/../shared/bench/gateway}"
ALGS="${ALGS:-EdDSA,ES256,RS256}"
CONNS_LIST="${CONNS_LIST:-50}"
ROUNDS="${ROUNDS:-5}"
DURATION="${DURATION:-6}"
WARMUP="${WARMUP:-1}"
BACKEND_PORT="${BACKEND_PORT:-18080}"
PORT_BASE="${PORT_BASE:-18190}"
TOKENS="${TOKENS:-6000}"
for t in wrk curl taskset python3; do
  command -v "$t" >/dev/null || { echo "missing: $t (apt-get install wrk)" >&2; exit 1; }
done
bench_backend
GANTRY="${GANTRY:-$ROOT/target/dist/gantry}"
[ -x "$GANTRY" ] || (cd "$ROOT" && cargo build --profile dist -q -p gantry)
ulimit -n 20000

WORK="$(mktemp -d -t gantry-auth.XXXXXX)"
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

# wrk script: each request takes the next token of the file.
cat >"$WORK/rotate.lua" <<'EOF'
local tokens = {}
local i = 0
init = function(args)
  for line in io.lines(args[1]) do tokens[#tokens + 1] = line end
end
request = function()
  i = i % #tokens + 1
  return wrk.format("GET", "/auth/", { ["Authorization"] = "Bearer " .. tokens[i] })
end
EOF

declare -A PID PORT
IFS=, read -ra AS <<<"$ALGS"
port=$PORT_BASE
for a in "${AS[@]}"; do
  d="$WORK/$a"
  mkdir -p "$d"
  cat >"$d/gantry.toml" <<EOF
[gateway]
listen = "127.0.0.1:$port"
workers = 1
request_id = false
trace_context = false
forwarded_headers = false

[admin]
listen = "127.0.0.1:0"

[identity]
listen = "127.0.0.1:0"
algorithm = "$a"
access_token_ttl_secs = 3600

[store]
data_dir = "$d/data"

[services.backend]
endpoints = ["127.0.0.1:$BACKEND_PORT"]
upstream = { load_balancer = "round_robin" }
[[services.backend.routes]]
path_prefix = "/open"
strip_prefix = true
retries = { attempts = 0 }
[[services.backend.routes]]
path_prefix = "/auth"
strip_prefix = true
retries = { attempts = 0 }
auth = "required"
scopes = ["bench"]
EOF
  taskset -c 0 "$GANTRY" up -f "$d/gantry.toml" >"$d.log" 2>&1 &
  PID[$a]=$!
  pids+=("${PID[$a]}")
  PORT[$a]=$port
  port=$((port + 1))
  for _ in $(seq 150); do
    [ -f "$d/data/admin.json" ] && curl -fs -o /dev/null "http://127.0.0.1:${PORT[$a]}/open/" && break
    sleep 0.1
  done
  curl -fs -o /dev/null "http://127.0.0.1:${PORT[$a]}/open/" || { echo "$a: gantry does not answer" >&2; cat "$d.log" >&2; exit 1; }
  # A client, and the tokens (one for the cached runs: the first).
  python3 - "$d/data" "$TOKENS" "$d/tokens.txt" <<'PY'
import base64, http.client, json, sys, urllib.parse
data, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
info = json.load(open(f"{data}/admin.json"))
token = open(f"{data}/admin-token").read().strip()
def conn(url):
    return http.client.HTTPConnection(urllib.parse.urlparse(url).netloc, timeout=30)
a = conn(info["admin_url"])
a.request("POST", "/v1/identity/clients", json.dumps({"id": "bench", "kind": "confidential", "scopes": ["bench"]}),
          {"authorization": f"Bearer {token}", "content-type": "application/json"})
r = a.getresponse()
secret = json.loads(r.read())["secret"]
assert r.status == 201, r.status
basic = base64.b64encode(f"bench:{secret}".encode()).decode()
c = conn(info["identity_url"])
with open(out, "w") as f:
    for _ in range(n):
        c.request("POST", "/oauth2/token", "grant_type=client_credentials&scope=bench",
                  {"authorization": f"Basic {basic}", "content-type": "application/x-www-form-urlencoded"})
        r = c.getresponse()
        body = json.loads(r.read())
        f.write(body["access_token"] + "\n")
PY
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $(head -1 "$d/tokens.txt")" "http://127.0.0.1:${PORT[$a]}/auth/")
  [ "$code" = 200 ] || { echo "$a: a valid token got $code" >&2; cat "$d.log" >&2; exit 1; }
done

declare -A CPU
hz=$(getconf CLK_TCK)
run() { # alg kind conns round
  local a="$1" kind="$2" conns="$3" r="$4" url args=()
  url="http://127.0.0.1:${PORT[$a]}"
  case "$kind" in
    none) args=("$url/open/") ;;
    cached) args=(-H "Authorization: Bearer $(head -1 "$WORK/$a/tokens.txt")" "$url/auth/") ;;
    uncached) args=(-s "$WORK/rotate.lua" "$url/auth/" -- "$WORK/$a/tokens.txt") ;;
  esac
  if [ "$WARMUP" != 0 ]; then
    timeout $((WARMUP + 20)) taskset -c 1 wrk -t1 -c"$conns" -d"${WARMUP}s" "${args[@]}" >/dev/null 2>&1 || true
  fi
  local t0 t1 reqs errs
  t0=$(ticks "${PID[$a]}")
  timeout $((DURATION + 30)) taskset -c 1 wrk -t1 -c"$conns" -d"${DURATION}s" "${args[@]}" >"$WORK/wrk.txt" 2>&1 || true
  t1=$(ticks "${PID[$a]}")
  reqs=$(awk '/requests in/{print $1}' "$WORK/wrk.txt")
  errs=$(awk '/Non-2xx/{s+=$NF} /Socket errors/{gsub(/[^0-9 ]/," "); s+=$1+$2+$3+$4} END{print s+0}' "$WORK/wrk.txt")
  CPU[$a,$kind,$conns,$r]=$(awk -v d=$((t1 - t0)) -v hz="$hz" -v n="${reqs:-0}" 'BEGIN{ if (n>0) printf "%.2f", d/hz*1e6/n; else print "" }')
  echo "round $r c=$conns $a $kind: ${CPU[$a,$kind,$conns,$r]} us/req, $reqs requests$([ "$errs" -gt 0 ] && echo ", $errs ERRORS")" >&2
}

kinds=(none cached uncached)
for r in $(seq "$ROUNDS"); do
  order=("${kinds[@]}")
  [ $((r % 2)) = 0 ] && order=(uncached cached none)
  for conns in $CONNS_LIST; do
    for a in "${AS[@]}"; do
      for k in "${order[@]}"; do run "$a" "$k" "$conns" "$r"; done
    done
  done
done

echo "# JWT verification cost: CPU per request of an authenticated route / the same route without authentication, medians of $ROUNDS rounds (wrk -t1 -d${DURATION}s; $(date -u +%FT%TZ))"
for a in "${AS[@]}"; do
  for conns in $CONNS_LIST; do
    cr=(); ur=(); nn=(); cc=(); uu=()
    for r in $(seq "$ROUNDS"); do
      n=${CPU[$a,none,$conns,$r]}; c=${CPU[$a,cached,$conns,$r]}; u=${CPU[$a,uncached,$conns,$r]}
      cr+=("$(awk -v a="$c" -v b="$n" 'BEGIN{ if (a>0 && b>0) printf "%.3f", a/b }')")
      ur+=("$(awk -v a="$u" -v b="$n" 'BEGIN{ if (a>0 && b>0) printf "%.3f", a/b }')")
      nn+=("$n"); cc+=("$c"); uu+=("$u")
    done
    printf '%-6s c=%-5s cached/none %s (rounds: %s)  uncached/none %s (rounds: %s)  [us/req: none %s, cached %s, uncached %s]\n' \
      "$a" "$conns" "$(median "${cr[@]}")" "${cr[*]}" "$(median "${ur[@]}")" "${ur[*]}" \
      "$(median "${nn[@]}")" "$(median "${cc[@]}")" "$(median "${uu[@]}")"
  done
done
