#!/usr/bin/env bash
# The full gateway (one granian worker) under wrk while its origin, then its Redis, restart.
#
#   bash benchmarks/bench_restarts.sh
#
# 24 s of wrk with 32 connections over the 50 bench tenants (fail-closed plan). At 6 s the
# nginx origin is stopped for a second and started again; at 12 s the private redis-server
# is shut down for a second and started again, with an empty script cache. Prints wrk's
# summary, the response statuses, and the status of one request made after the run. What it
# shows: 502 while the origin is down, 503 while Redis is down and until the breaker's probe
# succeeds, nothing that hangs, and 200 again afterwards (pooled upstream connections that
# died and the Redis link reconnect, and the admission script is reloaded).
set -u
cd "$(dirname "$0")/.."
W=$(mktemp -d /tmp/tollway-restarts.XXXXXX)
mkdir -p "$W/nginx"
redis() { redis-server --port 18379 --bind 127.0.0.1 --save "" --appendonly no --daemonize yes --dir "$W"; }
redis
sed -e "s|@DIR@|$W/nginx|" -e "s|@PORT@|18091|" -e "s|@WORKERS@|1|" -e "s|@UPSTREAM_PORT@|18091|" \
    -e "s|@LOCATION@|return 200 '{\"ok\":true}\\\\n';|" benchmarks/nginx.conf.template > "$W/nginx/nginx.conf"
/usr/sbin/nginx -p "$W/nginx" -c "$W/nginx/nginx.conf" & NP=$!
.venv/bin/python benchmarks/gateway_target.py serve --dir "$W/gw" --port 8080 \
    --redis-url redis://127.0.0.1:18379/0 > "$W/serve.log" 2>&1 & SP=$!
cleanup() {
    kill "$SP" 2>/dev/null; sleep 2; pkill -f "benchmarks.gateway_target:app"
    kill "$NP" 2>/dev/null; redis-cli -p 18379 shutdown nosave >/dev/null 2>&1
}
trap cleanup EXIT
for _ in $(seq 1 60); do grep -q "wrk script:" "$W/serve.log" 2>/dev/null && break; sleep 0.5; done
SCRIPT=$(grep "wrk script:" "$W/serve.log" | awk '{print $3}')
KEYS=$(grep "keys:" "$W/serve.log" | awk '{print $2}')
sleep 3
echo "$(date -u +%T) start, load $(cut -d' ' -f1-3 /proc/loadavg)"
wrk -t2 -c32 -d24s --timeout 5s -s "$SCRIPT" http://127.0.0.1:8080/ > "$W/wrk.txt" 2>&1 & WP=$!
sleep 6; echo "$(date -u +%T) origin stopped for 1 s"
kill "$NP"; wait "$NP" 2>/dev/null; sleep 1
/usr/sbin/nginx -p "$W/nginx" -c "$W/nginx/nginx.conf" & NP=$!
sleep 6; echo "$(date -u +%T) redis stopped for 1 s"
redis-cli -p 18379 shutdown nosave >/dev/null; sleep 1; redis
wait "$WP"
tail -8 "$W/wrk.txt"
KEY=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['tenants'][0]['key'])" "$KEYS")
curl -s -o /dev/null -w "a request after the run: %{http_code}\n" -H "X-API-Key: $KEY" http://127.0.0.1:8080/
