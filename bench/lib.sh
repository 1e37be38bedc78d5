# Sourced by the bench scripts: what they share, nginx as the shared harness configures it
# (../shared/bench/gateway/run.sh's gen_configs) included, so every script compares against the
# same nginx. Expects ROOT (the repository) and, for bench_backend, HARNESS.
#
#   nginx_prefix DIR LISTEN_PORT BACKEND_PORT [DIRECTIVE...]
#
# writes DIR/nginx.conf (and its log and temp folders) for `nginx -p DIR -c nginx.conf`;
# DIRECTIVEs go at the top, e.g. "master_process off;" to keep nginx in one process.
nginx_prefix() {
  local dir="$1" port="$2" backend="$3"
  shift 3
  mkdir -p "$dir/logs" "$dir/tmp"
  {
    printf '%s\n' "$@"
    cat <<EOF
daemon off;
worker_processes 1;
worker_rlimit_nofile 20000;
error_log logs/error.log warn;
pid logs/nginx.pid;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path tmp/client; proxy_temp_path tmp/proxy; fastcgi_temp_path tmp/fcgi;
  uwsgi_temp_path tmp/uwsgi; scgi_temp_path tmp/scgi;
  keepalive_requests 1000000;
  upstream backend { server 127.0.0.1:$backend; keepalive 1024; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$port backlog=4096;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
  } >"$dir/nginx.conf"
}

# wait_http PORT: until something answers HTTP on 127.0.0.1:PORT (10 s at most), else exit.
wait_http() {
  for _ in $(seq 100); do curl -fs -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.1; done
  echo "nothing answers on port $1" >&2
  exit 1
}

# ticks PID: the CPU ticks (user + system) of a process and its children.
ticks() {
  local s=0 p
  for p in "$1" $(pgrep -P "$1" || true); do
    s=$((s + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$s"
}

# median VALUE...: of the non-empty values; "nan" when there are none.
median() { printf '%s\n' "$@" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END{ if (NR==0) print "nan"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }

# to_ms LATENCY: a wrk latency ("850.00us", "1.20ms", "2.00s") in milliseconds.
to_ms() { awk -v v="$1" 'BEGIN{ if (v ~ /us$/) {sub(/us$/,"",v); print v/1000} else if (v ~ /ms$/) {sub(/ms$/,"",v); print v} else if (v ~ /s$/) {sub(/s$/,"",v); print v*1000} }'; }

# bench_backend: sets BACKEND to the harness backend, built first if missing.
bench_backend() {
  BACKEND="$HARNESS/backend/target/release/bench-backend"
  [ -x "$BACKEND" ] || (cd "$HARNESS/backend" && cargo build --release -q)
}

# start_proxy DIR WHAT PORT [ENV...]: WHAT is `nginx` (the harness's configuration, in one
# process) or a Gantry binary (with bench/gateway.sh's $VARIANT spec, run with the ENV
# assignments), proxying to BACKEND_PORT, on CPU 0, its log in DIR.log. Once it answers,
# PROXY_PID is its pid (also added to the caller's `pids`, for cleanup).
start_proxy() {
  local dir="$1" what="$2" port="$3"
  shift 3
  if [ "$what" = nginx ]; then
    command -v nginx >/dev/null || { echo "missing: nginx (apt-get install nginx-light)" >&2; exit 1; }
    nginx_prefix "$dir" "$port" "$BACKEND_PORT" "master_process off;"
    taskset -c 0 nginx -p "$dir" -c "$dir/nginx.conf" >"$dir.log" 2>&1 &
  else
    BACKEND_PORT="$BACKEND_PORT" GANTRY_PORT="$port" SPECS_ONLY="$dir" "$ROOT/bench/gateway.sh"
    [ -f "$dir/$VARIANT.toml" ] || { echo "no variant $VARIANT (plain, full or default)" >&2; exit 1; }
    env "$@" taskset -c 0 "$what" up -f "$dir/$VARIANT.toml" >"$dir.log" 2>&1 &
  fi
  PROXY_PID=$!
  pids+=("$PROXY_PID")
  wait_http "$port"
}
