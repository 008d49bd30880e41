#!/usr/bin/env bash
# Load comparison: varco and nginx as reverse proxies, side by side, in
# front of the same origin, in one run.
#
#   benches/load.sh                 # 5 alternating rounds of 10 s each
#   ROUNDS=3 SECONDS_PER_ROUND=5 CONNECTIONS=64 benches/load.sh
#   benches/load.sh --smoke         # 1 short round of each part: checks the harness
#                                   # (with the test build's binaries: figures
#                                   # of unoptimised code, never to be quoted)
#   BEFORE=/path/to/older/varco PARTS=waiting benches/load.sh
#                                   # that build too, in the same rounds (an A/B)
#   PARTS="proxy waiting" benches/load.sh   # some parts (default: all below)
#
# Parts:
#   proxy    varco and nginx proxying the origin (1 KiB page)
#   waiting  varco's waiting page (a new ticket per request) against nginx
#            limit_req answering 503: the cost of telling people to wait,
#            with the floor beside them (examples/page_floor.rs: varco's
#            listener answering with a fixed copy of the page, no gate);
#            then against nginx answering with a static copy of the same
#            page (error_page 503): like for like; then a ticket holder
#            reloading the page, and the page polling /.varco/status, each
#            against the same 503. With BEFORE set, that varco build joins
#            the comparisons with the 503 (contender "before"), and the
#            proxy comparison
#   memory   varco's resident memory after 1,000 tickets and after
#            1,000,000 (100,000 with --smoke): must stay flat
#   cluster  admitted traffic (a pass in hand) through varco with the
#            redis store against the memory store, and Redis commands per
#            admitted request (redis-server on the generator's core)
#   snapshot new arrivals on the waiting room above with store.snapshot
#            set (each ticket number written ahead to disk before it is
#            handed out) against the same room without one
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
PARTS=${PARTS:-proxy waiting memory cluster snapshot}
MANY_TICKETS=${MANY_TICKETS:-1000000}
# Cargo profile of the binaries measured. The smoke run only proves the
# harness works, so it takes the test build's (`dev`, the profile
# `cargo test` builds in): a release build of its own added 8 minutes
# to CI on 2 cores.
LOAD_PROFILE=${LOAD_PROFILE:-release}
if [ "${1:-}" = "--smoke" ]; then ROUNDS=1; SECS=2; CONNS=16; MANY_TICKETS=100000; LOAD_PROFILE=dev; fi

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need wrk || ! need redis-server; then
  echo "installing nginx, wrk and redis-server" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk redis-server >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

cargo build --profile "$LOAD_PROFILE" --quiet --bin varco --example page_floor
case $LOAD_PROFILE in
  dev | test) out="$here/target/debug" ;;
  bench) out="$here/target/release" ;;
  *) out="$here/target/$LOAD_PROFILE" ;;
esac
VARCO="$out/varco"
FLOOR_BIN="$out/examples/page_floor"
case $LOAD_PROFILE in
  release | bench) ;;
  *) echo "(profile $LOAD_PROFILE, not release: these figures are not varco's)" ;;
esac

work=$(mktemp -d /tmp/varco-load.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # varco writes its last snapshot as it stops, and the servers started in
  # $(...) are not this shell's children, so `wait` alone does not wait
  # for them: removing the folder under a stopping varco failed the run.
  for p in "${pids[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Every port at once, each socket held until all are drawn: drawn one at
# a time, a port let go could be drawn again for another server, and the
# second to start would find it taken.
read -r ORIGIN NGX NGX_LIMIT NGX_PAGE VAR VADM VWAIT VWADM VMEM VMADM \
  VGM VGMADM VGR VGRADM REDIS VFLOOR VSNAP VSNADM \
  VBEFORE VBADM VBPROXY VBPADM < <(python3 -c '
import socket
held = [socket.socket() for _ in range(22)]
for s in held:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in held))')

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
  # nginx's answer to a crowd: limit_req turning the excess away with 503.
  limit_req_zone \$binary_remote_addr zone=click:10m rate=1r/m;
  server {
    listen 127.0.0.1:$NGX_LIMIT;
    location / {
      limit_req zone=click;
      limit_req_status 503;
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
    }
  }
  # The same, answering with a static copy of varco's waiting page (same
  # bytes, no ticket, nothing personal): what an operator could build
  # with nginx alone, for a like-for-like figure.
  server {
    listen 127.0.0.1:$NGX_PAGE;
    location / {
      limit_req zone=click;
      limit_req_status 503;
      error_page 503 /waiting.html;
      proxy_pass http://origin;
    }
    location = /waiting.html {
      internal;
      root $work;
      # nginx at its best for a small static file.
      open_file_cache max=16 inactive=60s;
      sendfile on;
      tcp_nopush on;
      add_header Cache-Control \"no-store, private\" always;
    }
  }
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

server_block() { # port, admin port: one worker, as nginx gets one
  printf '[server]\nlisten = "127.0.0.1:%s"\nadmin_listen = "127.0.0.1:%s"\nworkers = 1' "$1" "$2"
}
start_varco() { # name, toml[, binary]; prints the pid
  printf '%s\n' "$2" > "$work/$1.toml"
  taskset -c 0 "${3:-$VARCO}" run --config "$work/$1.toml" > "$work/$1.out" 2>&1 &
  echo $!
}
common="[log]
access = false
level = \"warn\""
proxied="[upstream]
pool_max_idle = 128
[rooms.origin]
upstreams = [\"http://127.0.0.1:$ORIGIN\"]"
VARCO_PID=$(start_varco proxy "$(server_block "$VAR" "$VADM")
$common
$proxied")
pids+=("$VARCO_PID")
# The waiting room at its busiest: everyone is queued (queue_all, one
# admission a minute), so every request without a cookie takes a ticket and
# gets the waiting page.
gated="[secrets]
ephemeral = true
[rooms.origin]
upstreams = [\"http://127.0.0.1:$ORIGIN\"]
mode = \"queue_all\"
admission_per_minute = 1
per_ip = { tickets_per_minute = 100000000, status_per_minute = 100000000 }"
VWAIT_PID=$(start_varco waiting "$(server_block "$VWAIT" "$VWADM")
$common
$gated")
pids+=("$VWAIT_PID")
# Another build of varco on the same gated room, and proxying the same
# origin, for an A/B in one run.
before=(); before_proxy=()
if [ -n "${BEFORE:-}" ]; then
  VBEFORE_PID=$(start_varco before "$(server_block "$VBEFORE" "$VBADM")
$common
$gated" "$BEFORE")
  pids+=("$VBEFORE_PID")
  before=(before "$VBEFORE" "$VBEFORE_PID")
  VBPROXY_PID=$(start_varco before-proxy "$(server_block "$VBPROXY" "$VBPADM")
$common
$proxied" "$BEFORE")
  pids+=("$VBPROXY_PID")
  before_proxy=(before "$VBPROXY" "$VBPROXY_PID")
fi

wait_port() {
  for _ in $(seq 1 100); do
    if curl -s -o /dev/null "http://127.0.0.1:$1/"; then return 0; fi
    sleep 0.1
  done
  echo "nothing answers on port $1; the servers' output:" >&2
  for f in "$work"/*.out "$work"/logs/*.log; do
    [ -s "$f" ] && { echo "== $f" >&2; tail -n 20 "$f" >&2; }
  done
  exit 1
}
wait_port "$ORIGIN"; wait_port "$NGX"; wait_port "$VAR"; wait_port "$VWAIT"; wait_port "$NGX_LIMIT"; wait_port "$NGX_PAGE"
NGINX_WORKER=$(pgrep -P "${pids[1]}" | head -n1)

# wrk's latency report gives p99 in us/ms/s; normalise to milliseconds.
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
run_wrk() { # port, pid of the proxy's worker[, cookie[, path]]
  local before after
  local with=()
  [ -n "${3:-}" ] && with=(-H "Cookie: $3")
  before=$(cpu_ticks "$2")
  taskset -c 1 wrk -t1 -c"$CONNS" -d"${SECS}s" --latency "${with[@]}" "http://127.0.0.1:$1${4:-/}" > "$work/wrk.out"
  local rps p99
  rps=$(awk '/^Requests\/sec:/ {print $2}' "$work/wrk.out")
  p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub(/us$/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v*=1000}; print v}' "$work/wrk.out")
  local errs
  errs=$(awk '/Socket errors/ {print}' "$work/wrk.out")
  [ -n "$errs" ] && echo "  wrk reported: $errs" >&2
  after=$(cpu_ticks "$2")
  local cpu=$(( (after - before) * 100 / $(getconf CLK_TCK) / SECS ))
  echo "$rps $p99 $cpu"
}

# What each contender's requests carry: its own ticket, by name (set by a
# part; empty: no cookie), and the path asked for.
declare -A jar=()
ASK=/

median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

compare() { # title, then name port pid for each contender; nginx last
  # (each sends the Cookie jar[name], if any, and asks for $ASK)
  local title=$1; shift
  local names=() ports=() procs=()
  while [ $# -gt 0 ]; do names+=("$1"); ports+=("$2"); procs+=("$3"); shift 3; done
  local n=${#names[@]} i r k
  echo "== $title"
  for i in $(seq 0 $((n - 1))); do
    run_wrk "${ports[$i]}" "${procs[$i]}" "${jar[${names[$i]}]:-}" "$ASK" >/dev/null
    : > "$work/${names[$i]}.res"
  done
  for r in $(seq 1 "$ROUNDS"); do
    # Each round starts with the next contender, to cancel drift.
    for k in $(seq 0 $((n - 1))); do
      i=$(( (r - 1 + k) % n ))
      res=$(run_wrk "${ports[$i]}" "${procs[$i]}" "${jar[${names[$i]}]:-}" "$ASK")
      echo "$res" >> "$work/${names[$i]}.res"
      printf 'round %d %-6s  %10s req/s  p99 %8s ms  CPU %3s%%\n' "$r" "${names[$i]}" $res
    done
  done
  echo "medians over $ROUNDS rounds of ${SECS}s, $CONNS connections:"
  local rps=() p99=()
  for i in $(seq 0 $((n - 1))); do
    rps+=("$(awk '{print $1}' "$work/${names[$i]}.res" | median)")
    p99+=("$(awk '{print $2}' "$work/${names[$i]}.res" | median)")
    printf '  %-6s  %10.0f req/s  p99 %8.2f ms\n' "${names[$i]}" "${rps[$i]}" "${p99[$i]}"
  done
  local last=$((n - 1)) target
  for i in $(seq 0 $((last - 1))); do
    target=""; [ "$i" -eq 0 ] && target="${TARGET- (target >= 1.0)}"
    awk -v a="${rps[$i]}" -v b="${rps[$last]}" -v w="${names[$i]}/${names[$last]}" -v t="$target" \
      'BEGIN {printf "  throughput ratio %s: %.2f%s\n", w, a/b, t}'
    awk -v a="${p99[$i]}" -v b="${p99[$last]}" -v w="${names[$i]}/${names[$last]}" \
      'BEGIN {printf "  p99 latency ratio %s: %.2f\n", w, a/b}'
  done
  echo
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
issued() { # admin port: waiting pages served so far (one ticket each)
  curl -s "http://127.0.0.1:$1/metrics" | awk '/^varco_requests_total\{class="2xx",room="origin"\}/ {print $2}'
}
# Requests without cookies (each takes a new ticket) until the room has
# issued at least N tickets.
tickets() { # port, admin port, count
  local have
  have=$(issued "$2"); have=${have:-0}
  if [ "$3" -le 2000 ]; then
    while [ "$have" -lt "$3" ]; do
      seq 1 100 | xargs -P 8 -I{} curl -s -o /dev/null "http://127.0.0.1:$1/"
      have=$(issued "$2"); have=${have:-0}
    done
    return
  fi
  while [ "$have" -lt "$3" ]; do
    taskset -c 1 wrk -t1 -c16 -d2s "http://127.0.0.1:$1/" > /dev/null
    have=$(issued "$2"); have=${have:-0}
  done
}

cookie_from() { # port, kind (ticket or pass): what the room hands a new
  # arrival, as a Cookie header value
  curl -s -o /dev/null -c "$work/jar" "http://127.0.0.1:$1/"
  awk -v name="varco_$2_origin" '$6 == name {print $6 "=" $7}' "$work/jar"
}
redis_commands() { redis-cli -p "$REDIS" info stats | awk -F: '/^total_commands_processed/ {print $2+0}'; }

for part in $PARTS; do
  case $part in
    proxy)
      [ -n "${BEFORE:-}" ] && wait_port "$VBPROXY"
      compare "proxying a 1 KiB page (varco: proxy; nginx: proxy_pass, keepalive)" \
        varco "$VAR" "$VARCO_PID" "${before_proxy[@]}" nginx "$NGX" "$NGINX_WORKER"
      ;;
    waiting)
      # One waiting page and its ticket's Set-Cookie, for the floor and for
      # nginx's static copy.
      curl -s -D "$work/waiting.head" -o "$work/waiting.html" "http://127.0.0.1:$VWAIT/"
      cookie=$(awk 'tolower($1) == "set-cookie:" {sub(/^[^:]*: /, ""); sub(/\r$/, ""); print; exit}' "$work/waiting.head")
      taskset -c 0 "$FLOOR_BIN" "127.0.0.1:$VFLOOR" "$work/waiting.html" "$cookie" > "$work/floor.out" 2>&1 &
      FLOOR_PID=$!
      pids+=("$FLOOR_PID")
      wait_port "$VFLOOR"
      [ -n "${BEFORE:-}" ] && wait_port "$VBEFORE"
      # floor: varco's own listener answering with that fixed page, no
      # gate. varco/floor is the gate's share; floor/nginx the HTTP
      # stack's and the page's.
      compare "turning a crowd away (varco: ticket + waiting page; floor: the same listener, a fixed page; nginx: limit_req 503)" \
        varco "$VWAIT" "$VWAIT_PID" "${before[@]}" floor "$VFLOOR" "$FLOOR_PID" nginx "$NGX_LIMIT" "$NGINX_WORKER"
      # Like for like: nginx answers with the same page's bytes.
      compare "the same page (varco: ticket + waiting page; nginx: limit_req + a static copy of that page)" \
        varco "$VWAIT" "$VWAIT_PID" nginx "$NGX_PAGE" "$NGINX_WORKER"
      # Most of a click day's crowd already holds a ticket: it reloads
      # the page and the page polls its status. Each varco build gets a
      # ticket of its own (the rounds above put it far back in line, so it
      # stays waiting); nginx gets the same Cookie header, and its 503.
      jar[varco]=$(cookie_from "$VWAIT" ticket)
      [ -n "${BEFORE:-}" ] && jar[before]=$(cookie_from "$VBEFORE" ticket)
      jar[nginx]=${jar[varco]}
      for who in varco ${BEFORE:+before}; do
        port=$VWAIT; [ "$who" = before ] && port=$VBEFORE
        # Measured only while it really is waiting (not admitted, not a
        # fresh arrival each time).
        curl -s -H "Cookie: ${jar[$who]}" "http://127.0.0.1:$port/.varco/status?room=origin" |
          grep -q '"state":"waiting"' || { echo "$who: no waiting ticket" >&2; exit 1; }
      done
      compare "a ticket holder reloading (varco: ticket verified + waiting page; nginx: limit_req 503)" \
        varco "$VWAIT" "$VWAIT_PID" "${before[@]}" nginx "$NGX_LIMIT" "$NGINX_WORKER"
      ASK="/.varco/status?room=origin"
      compare "the page polling for status (varco: ticket verified + status JSON; nginx: limit_req 503)" \
        varco "$VWAIT" "$VWAIT_PID" "${before[@]}" nginx "$NGX_LIMIT" "$NGINX_WORKER"
      ASK=/; jar=()
      ;;
    memory)
      echo "== resident memory of varco as tickets are issued"
      VMEM_PID=$(start_varco memory "$(server_block "$VMEM" "$VMADM")
$common
$gated")
      pids+=("$VMEM_PID")
      wait_port "$VMEM"
      tickets "$VMEM" "$VMADM" 1000
      small=$(rss_kib "$VMEM_PID"); n_small=$(issued "$VMADM")
      tickets "$VMEM" "$VMADM" "$MANY_TICKETS"
      big=$(rss_kib "$VMEM_PID"); n_big=$(issued "$VMADM")
      printf '  after %9s tickets: %8d KiB\n' "$n_small" "$small"
      printf '  after %9s tickets: %8d KiB\n' "$n_big" "$big"
      awk -v a="$big" -v b="$small" 'BEGIN {printf "  ratio: %.2f (target: flat, ~1.0)\n", a/b}'
      echo
      ;;
    cluster)
      echo "== admitted traffic: redis store vs memory store"
      taskset -c 1 redis-server --port "$REDIS" --bind 127.0.0.1 --save "" --appendonly no > "$work/redis.out" 2>&1 &
      pids+=($!)
      until redis-cli -p "$REDIS" ping >/dev/null 2>&1; do sleep 0.1; done
      # Cluster mode takes no made-up key (each node would make its own):
      # one made here, from the environment, as a cluster's nodes share.
      VARCO_BENCH_KEYS="bench:$(head -c 32 /dev/urandom | base64)"
      export VARCO_BENCH_KEYS
      open="[secrets]
key_env = \"VARCO_BENCH_KEYS\"
[rooms.origin]
upstreams = [\"http://127.0.0.1:$ORIGIN\"]
max_active = 100000000
session_idle = \"1h\""
      VGM_PID=$(start_varco gm "$(server_block "$VGM" "$VGMADM")
$common
$open")
      VGR_PID=$(start_varco gr "$(server_block "$VGR" "$VGRADM")
$common
[store]
kind = \"redis\"
url = \"redis://127.0.0.1:$REDIS/\"
prefix = \"bench:\"
$open")
      pids+=("$VGM_PID" "$VGR_PID")
      wait_port "$VGM"; wait_port "$VGR"
      # The Redis node connects on its first request, within the store's
      # 500 ms: on a starved host that request may find the store not yet
      # there (a 503, no pass). Ask until the pass comes, 5 s at most.
      for _ in $(seq 1 50); do
        cm=$(cookie_from "$VGM" pass); cr=$(cookie_from "$VGR" pass)
        [ -n "$cm" ] && [ -n "$cr" ] && break
        sleep 0.1
      done
      [ -n "$cm" ] && [ -n "$cr" ] || {
        echo "no pass cookie; the servers' output:" >&2
        tail -n 20 "$work/gm.out" "$work/gr.out" >&2
        exit 1
      }
      run_wrk "$VGM" "$VGM_PID" "$cm" >/dev/null; run_wrk "$VGR" "$VGR_PID" "$cr" >/dev/null
      : > "$work/gm.res"; : > "$work/gr.res"; : > "$work/cmds.res"
      for r in $(seq 1 "$ROUNDS"); do
        m=$(run_wrk "$VGM" "$VGM_PID" "$cm" | awk '{print $1}')
        c0=$(redis_commands)
        rr=$(run_wrk "$VGR" "$VGR_PID" "$cr" | awk '{print $1}')
        c1=$(redis_commands)
        n=$(awk '/requests in/ {print $1}' "$work/wrk.out")
        echo "$m" >> "$work/gm.res"; echo "$rr" >> "$work/gr.res"
        awk -v c=$((c1 - c0)) -v n="$n" 'BEGIN {printf "%.6f\n", c/n}' >> "$work/cmds.res"
        printf 'round %d  memory %10s req/s  redis %10s req/s  redis commands %d for %d requests\n' "$r" "$m" "$rr" $((c1 - c0)) "$n"
      done
      m=$(median < "$work/gm.res"); rr=$(median < "$work/gr.res"); cpr=$(median < "$work/cmds.res")
      printf '  memory store %10.0f req/s\n  redis store  %10.0f req/s\n' "$m" "$rr"
      awk -v a="$rr" -v b="$m" 'BEGIN {printf "  throughput ratio redis/memory: %.2f (target >= 0.9)\n", a/b}'
      printf '  Redis commands per admitted request: %s (target <= 0.1)\n\n' "$cpr"
      ;;
    snapshot)
      VSNAP_PID=$(start_varco snapshot "$(server_block "$VSNAP" "$VSNADM")
$common
[store]
snapshot = \"$work/state.json\"
$gated")
      pids+=("$VSNAP_PID")
      wait_port "$VSNAP"
      TARGET=" (the cost of writing numbers ahead)" compare \
        "new arrivals with a snapshot file (numbers written ahead) and without" \
        snapshot "$VSNAP" "$VSNAP_PID" varco "$VWAIT" "$VWAIT_PID"
      ;;
    *) echo "unknown part: $part" >&2; exit 2 ;;
  esac
done
