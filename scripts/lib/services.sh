# shellcheck shell=bash
# PostgreSQL and Redis for the tests that need the real servers.
#
# ensure_services: makes sure both answer on 127.0.0.1 (5432, 6379): already running,
# started if installed, or installed from the distribution's packages when running as
# root. On success it exports KEEL_TEST_POSTGRES_URL and KEEL_TEST_REDIS_URL; the tests
# that need a server run only when its variable is set. When a server cannot be had, it
# fails if KEEL_REQUIRE_EXTERNAL=1 (CI sets it) and otherwise says which tests it skips.
#
# It never stops or reconfigures a running server: other projects' tests may share it.
# Keel's tests use their own database (keel_test) and their own Redis key prefixes.

PG_HOST=127.0.0.1
PG_PORT=5432
REDIS_PORT=6379
KEEL_TEST_DB=keel_test

log() { printf 'services: %s\n' "$*" >&2; }

wait_until() { # wait_until SECONDS COMMAND...
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -ge "$deadline" ] && return 1
    sleep 0.2
  done
}

apt_install() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
  log "installing $* from the distribution's packages"
  if [ -z "${KEEL_APT_UPDATED:-}" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || return 1
    export KEEL_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pg_up() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; }
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }

start_postgres() {
  command -v pg_isready >/dev/null || apt_install postgresql postgresql-client || return 1
  pg_up && return 0
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    if [ -z "$version" ]; then
      apt_install postgresql || return 1
      version=$(ls /etc/postgresql | sort -V | tail -n 1)
    fi
    log "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  fi
  wait_until 30 pg_up
}

start_redis() {
  command -v redis-cli >/dev/null && command -v redis-server >/dev/null || apt_install redis-server redis-tools || return 1
  redis_up && return 0
  log "starting Redis on 127.0.0.1:$REDIS_PORT (no persistence)"
  mkdir -p /tmp/keel-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir /tmp/keel-redis --logfile /tmp/keel-redis/redis.log || true
  wait_until 15 redis_up
}

psql_admin() { # as the superuser the local trust setup allows
  local user
  for user in postgres root "$(id -un)"; do
    if psql -X -q -h "$PG_HOST" -p "$PG_PORT" -U "$user" -d postgres -c 'SELECT 1' >/dev/null 2>&1; then
      psql -X -q -h "$PG_HOST" -p "$PG_PORT" -U "$user" -d postgres "$@"
      return
    fi
  done
  return 1
}

ensure_services() {
  local missing=()
  if start_postgres; then
    if ! psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = '$KEEL_TEST_DB'" | grep -q 1; then
      psql_admin -c "CREATE DATABASE $KEEL_TEST_DB" >/dev/null || missing+=("PostgreSQL (cannot create $KEEL_TEST_DB)")
    fi
    export KEEL_TEST_POSTGRES_URL="postgres://postgres@$PG_HOST:$PG_PORT/$KEEL_TEST_DB"
    log "PostgreSQL ready: $KEEL_TEST_POSTGRES_URL"
  else
    missing+=("PostgreSQL on $PG_HOST:$PG_PORT")
  fi
  if start_redis; then
    export KEEL_TEST_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
    log "Redis ready: $KEEL_TEST_REDIS_URL"
  else
    missing+=("Redis on 127.0.0.1:$REDIS_PORT")
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "${KEEL_REQUIRE_EXTERNAL:-}" = 1 ]; then
      log "FAILED: cannot reach, start or install: ${missing[*]} (KEEL_REQUIRE_EXTERNAL=1)"
      return 1
    fi
    log "WARNING: skipping the tests that need: ${missing[*]}"
  fi
}

# ensure_clients: the real clients the RESP tests drive (redis-cli; Python's redis
# package, whose version 8 opens with HELLO 3). Installed when missing and possible;
# the tests that need one skip (or fail under KEEL_REQUIRE_EXTERNAL=1) without it.
ensure_clients() {
  command -v redis-cli >/dev/null || apt_install redis-tools || log "WARNING: no redis-cli"
  if ! python3 -c 'import redis' >/dev/null 2>&1; then
    log "installing Python's redis package"
    python3 -m pip install --quiet --disable-pip-version-check 'redis>=5' >/dev/null 2>&1 ||
      python3 -m pip install --quiet --disable-pip-version-check --break-system-packages 'redis>=5' >/dev/null 2>&1 ||
      log "WARNING: cannot install Python's redis package"
  fi
}
