#!/usr/bin/env bash
# Prepare this machine for tests/test_kubernetes.py and tests/test_rolling_upgrade.py. Idempotent: each step is
# skipped when its result is already there.
#
#   bash scripts/kubernetes-tools.sh [--venv DIR]
#
# 1. kubectl with kustomize v5 (Kubernetes >= 1.27), from Debian's packages: the `kubectl` on PATH when it is
#    recent enough; else apt's own kubectl / kubernetes-client when its candidate is; else (Debian 12 bookworm
#    carries only kubectl 1.20, whose kustomize v2 cannot read a current kustomization) Debian 13 trixie's
#    `kubectl` package, fetched with apt into a private state directory and unpacked into .tools/bin (nothing
#    installed system-wide, no suite mixed into the machine's apt sources). The tests find .tools/bin/kubectl.
# 2. kubernetes-validate (the Kubernetes API's JSON schemas) in the venv (--venv, else $VIRTUAL_ENV, else python3's
#    environment); scripts/test.sh already installs it with the "test" extra.
# 3. HAProxy, the load balancer the rolling-upgrade test puts in front of two replicas.
#
# Exit status: 0 ready; 1 a tool could not be had.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VIRTUAL_ENV:-}"
while [ "$#" -gt 0 ]; do
    case "$1" in
        --venv) VENV="$2"; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "kubernetes-tools: unknown argument $1" >&2; exit 1 ;;
    esac
done

TOOLS_BIN="$REPO_ROOT/.tools/bin"
MIN_KUBECTL_MINOR=27  # the first kubectl with kustomize v5
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
APT_LOG=/tmp/kubernetes-tools-apt.log

log() { printf '[kubernetes-tools] %s\n' "$*" >&2; }
die() { log "ERROR: $1"; exit 1; }

kubectl_minor() {  # $1: a kubectl binary; prints its client minor version, or nothing
    "$1" version --client -o json 2>/dev/null | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p' | head -n 1
}
recent_enough() { local minor; minor="$(kubectl_minor "$1")"; [ -n "$minor" ] && [ "$minor" -ge "$MIN_KUBECTL_MINOR" ]; }
apt_candidate_minor() {  # $1: package; prints the minor version apt would install (1.32.3+ds-2 -> 32)
    apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: \([0-9]*:\)\{0,1\}1\.\([0-9]*\)\..*/\2/p' | head -n 1
}
apt_install() {
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >"$APT_LOG" 2>&1 || {
        apt-get update -qq >>"$APT_LOG" 2>&1 &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >>"$APT_LOG" 2>&1
    }
}

ensure_kubectl() {
    if [ -x "$TOOLS_BIN/kubectl" ] && recent_enough "$TOOLS_BIN/kubectl"; then
        log "kubectl 1.$(kubectl_minor "$TOOLS_BIN/kubectl") in .tools/bin"
        return 0
    fi
    if command -v kubectl >/dev/null 2>&1 && recent_enough "$(command -v kubectl)"; then
        log "kubectl 1.$(kubectl_minor "$(command -v kubectl)") on PATH"
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || die "no recent kubectl and no apt-get to install one"
    [ "$(id -u)" -eq 0 ] || die "no recent kubectl and this is not root: install Debian's kubectl (>= 1.$MIN_KUBECTL_MINOR)"
    [ -n "$(apt_candidate_minor kubectl)" ] || apt-get update -qq >>"$APT_LOG" 2>&1 || true
    local package
    for package in kubectl kubernetes-client; do
        local minor
        minor="$(apt_candidate_minor "$package")"
        if [ -n "$minor" ] && [ "$minor" -ge "$MIN_KUBECTL_MINOR" ]; then
            apt_install "$package" || die "apt-get install $package failed (see $APT_LOG)"
            recent_enough "$(command -v kubectl)" && return 0
        fi
    done
    # This Debian's kubectl is too old: take the next release's package, without adding it to the system's sources.
    local state
    state="$(mktemp -d /tmp/kubernetes-tools-apt.XXXXXX)"
    mkdir -p "$state/lists/partial" "$state/cache/archives/partial" "$state/sources"
    : >"$state/status"  # an empty package database: what this machine has installed plays no part
    printf 'Types: deb\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$DEBIAN_MIRROR" >"$state/sources/trixie.sources"
    local apt_opts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$state/sources"
        -o "Dir::State::Lists=$state/lists" -o "Dir::State::status=$state/status" -o "Dir::Cache=$state/cache"
        -o APT::Sandbox::User=root)
    log "this Debian's kubectl is older than 1.$MIN_KUBECTL_MINOR: fetching Debian trixie's kubectl package"
    apt-get "${apt_opts[@]}" -qq update >>"$APT_LOG" 2>&1 || die "apt-get update (trixie) failed (see $APT_LOG)"
    (cd "$state" && apt-get "${apt_opts[@]}" -qq download kubectl/trixie >>"$APT_LOG" 2>&1) ||
        die "apt-get download kubectl (trixie) failed (see $APT_LOG)"
    dpkg-deb -x "$(ls "$state"/kubectl_*.deb | head -n 1)" "$state/root"
    mkdir -p "$TOOLS_BIN"
    install -m 0755 "$state/root/usr/bin/kubectl" "$TOOLS_BIN/kubectl"
    rm -rf "$state"
    recent_enough "$TOOLS_BIN/kubectl" || die "the unpacked kubectl does not run"
    log "kubectl 1.$(kubectl_minor "$TOOLS_BIN/kubectl") in .tools/bin"
}

ensure_validator() {
    local python="python3"
    if [ -n "$VENV" ]; then python="$VENV/bin/python"; fi
    if "$python" -c 'import kubernetes_validate' >/dev/null 2>&1; then
        log "kubernetes-validate present ($python)"
        return 0
    fi
    log "pip install kubernetes-validate with $python"
    "$python" -m pip install -q --disable-pip-version-check kubernetes-validate || die "pip install kubernetes-validate failed"
}

ensure_haproxy() {
    if command -v haproxy >/dev/null 2>&1; then
        log "$(haproxy -v | head -n 1)"
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || die "no haproxy and this is not root: apt-get install haproxy"
    apt_install haproxy || die "apt-get install haproxy failed (see $APT_LOG)"
    # The package's own service is not wanted: the test starts its own haproxy on free ports.
    log "$(haproxy -v | head -n 1)"
}

ensure_kubectl
ensure_validator
ensure_haproxy
