#!/usr/bin/env bash
# Build the CUDA image (docker/Dockerfile, TORCH_FLAVOUR=cuda, torch's CUDA build from PyPI) on any base image,
# start it on this host, GPU or not (without one the CUDA torch falls back to the CPU), and report the figures:
# image size, build time, start time (docker run -> /ready 200), the device it serves on, torch.version.cuda.
# Not part of CI: it downloads torch's CUDA build and its nvidia-* wheels (several GB).
#
#   bash scripts/build-cuda-image.sh [--base IMAGE] [--tag IMAGE:TAG] [--venv DIR] [--ca-bundle FILE]
#                                    [--model-shape full|tiny] [--no-cache | --no-build] [--keep]
#
#   --base        base image (default $BASE_IMAGE, else reranker-test-base:bookworm from scripts/docker-setup.sh;
#                 the Dockerfile's own default is nvidia/cuda:13.0.0-base-ubuntu24.04, from Docker Hub)
#   --tag         image to build and start (default reranker:cuda-local)
#   --venv        Python environment with the project's dependencies, to build the test model (default .venv)
#   --ca-bundle   PEM file copied to docker/certs/host-ca-bundle.crt (a proxy's or mirror's CA) before the build
#   --model-shape the random model served: "full" (bge-reranker-base's dimensions, default) or "tiny"
#   --no-cache    build every layer afresh (docker build --no-cache): the build time of a first build
#   --no-build    start and measure the image already tagged
#   --keep        leave the container running (it is removed on exit otherwise)
#
# TORCH_VERSION (default 2.13.0), TORCH_INDEX_URL and PIP_INDEX_URL pass through as build arguments. The build
# log goes to $BUILD_LOG (default /tmp/build-cuda-image.log). Exit status: 0 the image served a rerank; 1 not.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE="${BASE_IMAGE:-reranker-test-base:bookworm}"
TAG="reranker:cuda-local"
VENV="$REPO_ROOT/.venv"
CA_BUNDLE=""
MODEL_SHAPE="full"
BUILD=1
NO_CACHE=()
KEEP=0
while [ "$#" -gt 0 ]; do
    case "$1" in
        --base) BASE="$2"; shift 2 ;;
        --tag) TAG="$2"; shift 2 ;;
        --venv) VENV="$2"; shift 2 ;;
        --ca-bundle) CA_BUNDLE="$2"; shift 2 ;;
        --model-shape) MODEL_SHAPE="$2"; shift 2 ;;
        --no-cache) NO_CACHE=(--no-cache); shift ;;
        --no-build) BUILD=0; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "build-cuda-image: unknown argument $1" >&2; exit 1 ;;
    esac
done

TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
BUILD_LOG="${BUILD_LOG:-/tmp/build-cuda-image.log}"
CONTAINER="reranker-cuda-local-$$"
WORKDIR="$(mktemp -d /tmp/build-cuda-image.XXXXXX)"
START=$(date +%s)
log() { printf '[build-cuda-image +%ss] %s\n' "$(($(date +%s) - START))" "$*" >&2; }
die() { log "ERROR: $1"; exit 1; }
now() { date +%s.%N; }
seconds_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

cleanup() {
    if [ "$KEEP" -eq 0 ]; then docker rm -f "$CONTAINER" >/dev/null 2>&1 || true; fi
    rm -rf "$WORKDIR"
}
trap cleanup EXIT

timeout 20 docker info >/dev/null 2>&1 || die "no Docker engine answers (bash scripts/docker-setup.sh starts one)"
docker image inspect "$BASE" >/dev/null 2>&1 || docker pull "$BASE" >/dev/null || die "no base image $BASE"
[ -x "$VENV/bin/python" ] || die "no Python environment at $VENV (--venv DIR)"

# --- build ------------------------------------------------------------------------------------------------------
BUILD_S="(not built)"
if [ "$BUILD" -eq 1 ]; then
    if [ -n "$CA_BUNDLE" ]; then
        [ -f "$CA_BUNDLE" ] || die "no CA bundle at $CA_BUNDLE"
        cmp -s "$CA_BUNDLE" "$REPO_ROOT/docker/certs/host-ca-bundle.crt" ||
            cp "$CA_BUNDLE" "$REPO_ROOT/docker/certs/host-ca-bundle.crt"
    fi
    args=(--build-arg "BASE_IMAGE=$BASE" --build-arg TORCH_FLAVOUR=cuda --build-arg "TORCH_VERSION=$TORCH_VERSION")
    if [ -n "${TORCH_INDEX_URL:-}" ]; then args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL"); fi
    if [ -n "${PIP_INDEX_URL:-}" ]; then args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL"); fi
    log "docker build ${NO_CACHE[*]} -f docker/Dockerfile ${args[*]} -t $TAG . (log: $BUILD_LOG)"
    started=$(now)
    if ! docker build "${NO_CACHE[@]}" -f "$REPO_ROOT/docker/Dockerfile" "${args[@]}" -t "$TAG" "$REPO_ROOT" \
        >"$BUILD_LOG" 2>&1; then
        tail -n 20 "$BUILD_LOG" >&2
        die "docker build failed (log: $BUILD_LOG)"
    fi
    BUILD_S="$(seconds_since "$started") s"
    log "built $TAG in $BUILD_S"
fi
docker image inspect "$TAG" >/dev/null 2>&1 || die "no image $TAG (build it: drop --no-build)"

TORCH_INFO="$(docker run --rm --entrypoint python "$TAG" -c \
    'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())')"
read -r TORCH_IMAGE_VERSION TORCH_CUDA CUDA_AVAILABLE <<<"$TORCH_INFO"
[ "$TORCH_CUDA" != "None" ] || die "$TAG holds torch $TORCH_IMAGE_VERSION, a CPU build (torch.version.cuda is None)"

# --- model ------------------------------------------------------------------------------------------------------
log "building a random $MODEL_SHAPE bge-reranker-base-layout model (tests/model_factory.py)"
(cd "$REPO_ROOT" && "$VENV/bin/python" -m tests.model_factory --family bge-reranker-base \
    --shape "$MODEL_SHAPE" "$WORKDIR/model" >/dev/null 2>"$WORKDIR/model.log") ||
    { cat "$WORKDIR/model.log" >&2; die "could not build the model"; }
chmod -R a+rX "$WORKDIR/model"  # the container's user (uid 10001) reads it

# --- start ------------------------------------------------------------------------------------------------------
# Hardened as compose.yaml runs it: read-only root, tmpfs /tmp, no capabilities. No --gpus: the host may have none.
log "docker run $TAG (container $CONTAINER), model mounted read-only at /model"
started=$(now)
docker run -d --name "$CONTAINER" -p 127.0.0.1::9300 \
    --read-only --tmpfs /tmp:size=256m,mode=1777 \
    --tmpfs /tmp/reranker-metrics:size=64m,uid=10001,gid=10001,mode=0700 \
    --cap-drop ALL --security-opt no-new-privileges:true \
    -v "$WORKDIR/model:/model:ro" "$TAG" >/dev/null
PORT="$(docker port "$CONTAINER" 9300/tcp | head -n 1 | sed 's/.*://')"
URL="http://127.0.0.1:$PORT"
READY=0
for _ in $(seq 1 1200); do
    if curl -fsS -o /dev/null "$URL/ready" 2>/dev/null; then READY=1; break; fi
    [ "$(docker inspect -f '{{.State.Running}}' "$CONTAINER")" = true ] || break
    sleep 0.5
done
START_S="$(seconds_since "$started") s"
if [ "$READY" -ne 1 ]; then
    docker logs --tail 30 "$CONTAINER" >&2 || true
    die "$TAG did not answer /ready 200 (container: $(docker inspect -f '{{.State.Status}}' "$CONTAINER"))"
fi
log "/ready 200 after $START_S"

MODELS="$(curl -fsS "$URL/v1/models")"
RERANK="$(curl -fsS "$URL/v1/rerank" -H 'Content-Type: application/json' -d '{
  "model": "bge-reranker",
  "query": "What is the capital of France?",
  "documents": ["Paris is the capital of France.", "Bananas are rich in potassium.", "Berlin is in Germany."],
  "top_n": 3
}')" || die "the rerank failed"
log "rerank: $RERANK"
# /v1/models names what was loaded: the device and the compute dtype.
SERVED="$(printf '%s' "$MODELS" | "$VENV/bin/python" -c \
    'import json, sys; card = json.load(sys.stdin)["data"][0]; print(card["device"], card["dtype"])')"
SIZE_BYTES="$(docker image inspect -f '{{.Size}}' "$TAG")"

echo
echo "image                $TAG (base $BASE)"
echo "image size           $(awk -v b="$SIZE_BYTES" 'BEGIN { printf "%.2f GB (%.0f bytes)", b / 1e9, b }')"
echo "build time           $BUILD_S"
echo "start time           $START_S (docker run -> /ready 200, $MODEL_SHAPE model, $(nproc) CPUs)"
echo "torch                $TORCH_IMAGE_VERSION, torch.version.cuda $TORCH_CUDA, cuda available: $CUDA_AVAILABLE"
echo "served on            $SERVED (device, dtype; /v1/models)"
echo "startup log:"
docker logs "$CONTAINER" 2>&1 | grep -E 'model ready|cuda|CUDA' | grep -v 'settings {' | head -n 8 |
    sed 's/^/  /' || true
if [ "$KEEP" -eq 1 ]; then echo "container            $CONTAINER on $URL (docker rm -f $CONTAINER)"; fi
