#!/usr/bin/env bash
# `make run`: migrate, make the demo login, and run web + consumer + the local SendGrid sink.
# Embedded defaults (SQLite, SqliteHuey) unless DATABASE_URL / REDIS_URL are set. Ctrl-C stops all.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
PORT=${PORT:-5000}
SINK_PORT=${HERALD_SINK_PORT:-3030}
export PUBLIC_URL=${PUBLIC_URL:-http://127.0.0.1:$PORT}
# The sink posts signed delivery events back to Herald's webhook, as SendGrid would.
export HERALD_SINK_EVENTS_URL=${HERALD_SINK_EVENTS_URL:-$PUBLIC_URL/webhooks/sendgrid/events}

flask --app wsgi migrate
flask --app wsgi demo

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo; echo "stopping web, consumer and sink ..."
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup INT TERM EXIT

flask --app wsgi sendgrid-sink --port "$SINK_PORT" & pids+=($!)
huey_consumer tasks.huey -k thread -w 8 -g TERM -t 30 -d 0.05 -m 0.5 & pids+=($!)
gunicorn -k gthread -w 2 --threads 16 -b "127.0.0.1:$PORT" --access-logfile - wsgi:app & pids+=($!)

sleep 1
echo
echo "Herald is running: $PUBLIC_URL   (local outbox: http://127.0.0.1:$SINK_PORT/)"
echo "Press Ctrl-C to stop."
wait -n "${pids[@]}" || true
