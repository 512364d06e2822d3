#!/usr/bin/env bash
# Make sure PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379) answer, for the tests.
# Starts them when they are installed but down; installs them with apt when missing (as root).
set -euo pipefail

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "services: $* missing and not root; install them or set HERALD_TEST_PG" >&2; exit 1
  fi
  if [ -z "${_APT_UPDATED:-}" ]; then apt-get update -qq; _APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; }

if [ -n "${HERALD_TEST_PG:-}" ]; then
  echo "services: PostgreSQL from HERALD_TEST_PG (not checked here)"
elif ! command -v pg_isready >/dev/null || ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
  echo "services: installing PostgreSQL"; apt_install postgresql
fi
if [ -z "${HERALD_TEST_PG:-}" ] && ! pg_up; then
  echo "services: starting PostgreSQL"
  ver=$(ls /etc/postgresql | sort -V | tail -n 1)
  conf=/etc/postgresql/$ver/main
  # trust on loopback for the test user, as the development machines have it
  if ! grep -q "herald-test" "$conf/pg_hba.conf" 2>/dev/null; then
    sed -i '1i host all all 127.0.0.1/32 trust # herald-test\nhost all all ::1/128 trust # herald-test\nlocal all all trust # herald-test' "$conf/pg_hba.conf"
  fi
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start || pg_ctlcluster "$ver" main start
  for _ in $(seq 1 30); do pg_up && break; sleep 1; done
fi
[ -n "${HERALD_TEST_PG:-}" ] || pg_up || { echo "services: PostgreSQL does not answer on 127.0.0.1:5432" >&2; exit 1; }

if ! command -v redis-server >/dev/null; then
  echo "services: installing Redis"; apt_install redis-server
fi
if ! redis_up; then
  echo "services: starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/herald.log
  for _ in $(seq 1 30); do redis_up && break; sleep 0.5; done
fi
redis_up || { echo "services: Redis does not answer on 127.0.0.1:6379" >&2; exit 1; }
if [ -n "${HERALD_TEST_PG:-}" ]; then echo "services: Redis answers (PostgreSQL: HERALD_TEST_PG)"
else echo "services: PostgreSQL and Redis answer"; fi
