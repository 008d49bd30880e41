#!/usr/bin/env bash
# Load comparison: varco and nginx as reverse proxies, side by side, in
# front of the same origin, in one run.
#
#   benches/load.sh                 # 5 alternating rounds of 10 s each
#   ROUNDS=3 SECONDS_PER_ROUND=5 CONNECTIONS=64 benches/load.sh
#   benches/load.sh --smoke         # 1 short round: checks the harness
#
# Layout on a 2-core machine: each proxy (varco with 1 worker thread,
# nginx with 1 worker process) alone on core 0; the load generator (wrk,
# 1 thread) and the origin (a separate nginx, 1 worker) on core 1. The
# proxy's own CPU use per round is printed: near 100% means the proxy, not
# the generator, is what limits the round. Rounds alternate varco/nginx to
# cancel drift; medians and varco/nginx ratios are printed. Only 127.0.0.1
# is targeted.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

ROUNDS=${ROUNDS:-5}
SECS=${SECONDS_PER_ROUND:-10}
CONNS=${CONNECTIONS:-64}
if [ "${1:-}" = "--smoke" ]; then ROUNDS=1; SECS=2; CONNS=16; fi

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need wrk; then
  echo "installing nginx and wrk" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

cargo build --release --quiet
VARCO="$here/target/release/varco"

work=$(mktemp -d /tmp/varco-load.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ORIGIN=$(port); NGX=$(port); VAR=$(port); VADM=$(port)

# A 1 KiB page: the size of a small personalised response.
head -c 1024 /dev/zero | tr '\0' 'x' > "$work/page.html"
mkdir -p "$work/tmp" "$work/logs"
nginx_conf() { # name, server block
  cat <<NGINX
user root;
worker_processes 1;
pid $work/$1.pid;
error_log $work/logs/$1.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/tmp/$1-body;
  proxy_temp_path $work/tmp/$1-proxy;
  fastcgi_temp_path $work/tmp/$1-fastcgi;
  uwsgi_temp_path $work/tmp/$1-uwsgi;
  scgi_temp_path $work/tmp/$1-scgi;
  keepalive_requests 1000000;
  $2
}
NGINX
}
# The origin both proxies share.
nginx_conf origin "server { listen 127.0.0.1:$ORIGIN; location / { root $work; try_files /page.html =404; } }" > "$work/origin.conf"
# nginx as a reverse proxy, configured as an operator would.
nginx_conf proxy "upstream origin { server 127.0.0.1:$ORIGIN; keepalive 128; }
  server {
    listen 127.0.0.1:$NGX;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
    }
  }" > "$work/proxy.conf"
taskset -c 1 "$NGINX" -p "$work" -c "$work/origin.conf" -g 'daemon off;' &
pids+=($!)
taskset -c 0 "$NGINX" -p "$work" -c "$work/proxy.conf" -g 'daemon off;' &
pids+=($!)

cat > "$work/varco.toml" <<VARCO
[server]
listen = "127.0.0.1:$VAR"
admin_listen = "127.0.0.1:$VADM"
workers = 1
[log]
access = false
level = "warn"
[upstream]
pool_max_idle = 128
[rooms.origin]
upstreams = ["http://127.0.0.1:$ORIGIN"]
VARCO
taskset -c 0 "$VARCO" run --config "$work/varco.toml" > "$work/varco.out" &
pids+=($!)

wait_port() {
  for _ in $(seq 1 100); do
    if curl -fsS -o /dev/null "http://127.0.0.1:$1/"; then return 0; fi
    sleep 0.1
  done
  echo "nothing answers on port $1" >&2; exit 1
}
wait_port "$ORIGIN"; wait_port "$NGX"; wait_port "$VAR"
VARCO_PID=${pids[2]}
NGINX_WORKER=$(pgrep -P "${pids[1]}" | head -n1)

# wrk's latency report gives p99 in us/ms/s; normalise to milliseconds.
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
run_wrk() { # port, pid of the proxy's worker
  local before after
  before=$(cpu_ticks "$2")
  taskset -c 1 wrk -t1 -c"$CONNS" -d"${SECS}s" --latency "http://127.0.0.1:$1/" > "$work/wrk.out"
  local rps p99
  rps=$(awk '/^Requests\/sec:/ {print $2}' "$work/wrk.out")
  p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub(/us$/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v*=1000}; print v}' "$work/wrk.out")
  local errs
  errs=$(awk '/Non-2xx|Socket errors/ {print}' "$work/wrk.out")
  [ -n "$errs" ] && echo "  wrk reported: $errs" >&2
  after=$(cpu_ticks "$2")
  local cpu=$(( (after - before) * 100 / $(getconf CLK_TCK) / SECS ))
  echo "$rps $p99 $cpu"
}

median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

# Warm both pools up.
run_wrk "$VAR" "$VARCO_PID" >/dev/null; run_wrk "$NGX" "$NGINX_WORKER" >/dev/null

: > "$work/varco.res"; : > "$work/nginx.res"
for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then order="varco nginx"; else order="nginx varco"; fi
  for who in $order; do
    if [ "$who" = varco ]; then res=$(run_wrk "$VAR" "$VARCO_PID"); else res=$(run_wrk "$NGX" "$NGINX_WORKER"); fi
    echo "$res" >> "$work/$who.res"
    printf 'round %d %-5s  %10s req/s  p99 %8s ms  proxy CPU %3s%%\n' "$r" "$who" $res
  done
done

v_rps=$(awk '{print $1}' "$work/varco.res" | median)
n_rps=$(awk '{print $1}' "$work/nginx.res" | median)
v_p99=$(awk '{print $2}' "$work/varco.res" | median)
n_p99=$(awk '{print $2}' "$work/nginx.res" | median)
echo
echo "medians over $ROUNDS rounds of ${SECS}s, $CONNS connections, 1 KiB responses:"
printf '  varco  %10.0f req/s  p99 %8.2f ms\n' "$v_rps" "$v_p99"
printf '  nginx  %10.0f req/s  p99 %8.2f ms\n' "$n_rps" "$n_p99"
awk -v a="$v_rps" -v b="$n_rps" 'BEGIN {printf "  throughput ratio varco/nginx: %.2f (target >= 1.0)\n", a/b}'
awk -v a="$v_p99" -v b="$n_p99" 'BEGIN {printf "  p99 latency ratio varco/nginx: %.2f (target <= 1.0)\n", a/b}'
