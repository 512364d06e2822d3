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

# The sink signs the events it posts with a key pair kept under instance/, and Herald verifies
# them with its public key, exactly as with SendGrid's Signed Event Webhook.
INSTANCE_DIR=${HERALD_INSTANCE_DIR:-instance}
mkdir -p "$INSTANCE_DIR"
SINK_KEY="$INSTANCE_DIR/sink-event-key.pem"
[ -f "$SINK_KEY" ] || python -c 'import os, sys
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec
pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600); os.write(fd, pem); os.close(fd)' "$SINK_KEY"
export HERALD_SINK_EVENT_PRIVATE_KEY_PEM="$(cat "$SINK_KEY")"
if [ -z "${SENDGRID_API_KEY:-}" ] && [ -z "${SENDGRID_WEBHOOK_PUBLIC_KEY:-}" ]; then
  SENDGRID_WEBHOOK_PUBLIC_KEY="$(python -c 'import os
from cryptography.hazmat.primitives import serialization as s
from sendgrid_sink import public_key_b64
print(public_key_b64(s.load_pem_private_key(os.environ["HERALD_SINK_EVENT_PRIVATE_KEY_PEM"].encode(), None)))')"
  export SENDGRID_WEBHOOK_PUBLIC_KEY
fi

pids=()
names=()
stopped=0
cleanup() {
  [ "$stopped" = 1 ] && return
  stopped=1
  echo; echo "stopping web, consumer and sink ..."
  # TERM: gunicorn and the sink stop, the consumer lets its in-flight sends finish (-g TERM)
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM
trap cleanup EXIT

# Each in its own session (setsid): Ctrl-C reaches this script only, which stops them with TERM,
# rather than the whole terminal group at once (SIGINT would stop the consumer without waiting).
setsid flask --app wsgi sendgrid-sink --port "$SINK_PORT" & pids+=($!); names+=("sink (port $SINK_PORT)")
setsid huey_consumer tasks.huey -k thread -w 8 -g TERM -t 30 -d 0.05 -m 0.5 & pids+=($!); names+=("consumer")
setsid gunicorn -k gthread -w 2 --threads 16 -b "127.0.0.1:$PORT" --access-logfile - wsgi:app & pids+=($!)
names+=("web (port $PORT)")

sleep 1
echo
echo "Herald is running: $PUBLIC_URL   (local outbox: http://127.0.0.1:$SINK_PORT/)"
echo "Press Ctrl-C to stop."
set +e
wait -n "${pids[@]}"
code=$?
# One process ended on its own (Ctrl-C and TERM go to the traps, which exit): say which, then
# stop the others (the EXIT trap).
for i in "${!pids[@]}"; do
  if ! kill -0 "${pids[$i]}" 2>/dev/null; then
    echo "make run: the ${names[$i]} exited (status $code); its output is above" >&2
  fi
done
exit "$code"
