#!/usr/bin/env bash
# What a room's in_flight cap costs a proxied request: one nginx origin
# (a 1 KiB page), varco proxying it from a room without a cap and from one
# with `in_flight = { limit = 1000 }` (never reached: the slot and, since
# the forwarding of a capped room runs on a task of its own, that task),
# each alone on core 0 with one worker; wrk and the origin on core 1;
# rounds alternate. BEFORE=/path/to/another/varco adds that build's capped
# room, for an A/B of the same room in one run.
#
#   benches/in_flight_ab.sh
#   ROUNDS=5 SECONDS_PER_ROUND=6 BEFORE=/tmp/old/varco benches/in_flight_ab.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
SECONDS_PER_ROUND=${SECONDS_PER_ROUND:-6}
CONNECTIONS=${CONNECTIONS:-64}
VARCO=${VARCO:-target/release/varco}
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$1/" && return; sleep 0.05; done; echo "nothing on $1" >&2; exit 1; }

ORIGIN=$(free_port)
head -c 1024 /dev/zero | tr '\0' 'a' > "$work/page.html"
cat > "$work/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/error.log;
events { worker_connections 1024; }
http { access_log off; server { listen 127.0.0.1:$ORIGIN; root $work; location / { } } }
CONF
taskset -c 1 nginx -c "$work/nginx.conf" &
pids+=($!)
wait_port "$ORIGIN"

start() { # name, binary, room lines
  local port admin
  port=$(free_port); admin=$(free_port)
  printf '[server]\nlisten = "127.0.0.1:%s"\nadmin_listen = "127.0.0.1:%s"\nworkers = 1\n[log]\naccess = false\nlevel = "warn"\n[upstream]\npool_max_idle = 128\n[rooms.origin]\nupstreams = ["http://127.0.0.1:%s"]\n%s\n' \
    "$port" "$admin" "$ORIGIN" "$3" > "$work/$1.toml"
  taskset -c 0 "$2" run --config "$work/$1.toml" > "$work/$1.out" 2>&1 &
  pids+=($!)
  wait_port "$port"
  echo "$port"
}
names=(plain capped)
ports=("$(start plain "$VARCO" "")" "$(start capped "$VARCO" 'in_flight = { limit = 1000 }')")
if [ -n "${BEFORE:-}" ]; then
  names+=(before_capped)
  ports+=("$(start before_capped "$BEFORE" 'in_flight = { limit = 1000 }')")
fi

declare -A rates p99s
for r in $(seq "$ROUNDS"); do
  for i in "${!names[@]}"; do
    out=$(taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d"${SECONDS_PER_ROUND}s" --latency "http://127.0.0.1:${ports[$i]}/page.html")
    rates[${names[$i]}]+="$(awk '/Requests\/sec/{print $2}' <<<"$out") "
    p99s[${names[$i]}]+="$(awk '/ 99%/{v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else {sub(/s/,"",v); v*=1000}; print v}' <<<"$out") "
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for n in "${names[@]}"; do
  printf '%-14s req/s median %10.0f   p99 median %6.2f ms   (req/s: %s)\n' "$n" \
    "$(median <<<"${rates[$n]}")" "$(median <<<"${p99s[$n]}")" "${rates[$n]}"
done
plain=$(median <<<"${rates[plain]}")
capped=$(median <<<"${rates[capped]}")
awk -v a="$capped" -v b="$plain" 'BEGIN {printf "  throughput ratio capped/plain: %.2f\n", a/b}'
if [ -n "${BEFORE:-}" ]; then
  before=$(median <<<"${rates[before_capped]}")
  awk -v a="$capped" -v b="$before" 'BEGIN {printf "  throughput ratio capped/before_capped: %.2f\n", a/b}'
fi
