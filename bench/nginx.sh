# Sourced by the bench scripts: nginx as the shared harness configures it
# (../shared/bench/gateway/run.sh's gen_configs), so every script compares against the same nginx.
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
