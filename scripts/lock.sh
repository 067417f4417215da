#!/usr/bin/env bash
# Writes requirements.lock: every runtime dependency in pyproject.toml ([project] dependencies), pinned with
# hashes, for every Python and platform the image may run (uv's universal resolution). The image installs it
# with --require-hashes, so two builds a month apart get the same packages. PyTorch is not in it: the image
# installs the CPU or CUDA build first (docker/Dockerfile).
#
#   ./scripts/lock.sh            after changing [project] dependencies; commit requirements.lock with it
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}
command -v "$UV" >/dev/null || UV=".venv/bin/uv"
"$UV" pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes --quiet \
  --custom-compile-command "./scripts/lock.sh" -o requirements.lock
echo "wrote requirements.lock ($(grep -c '^[a-z]' requirements.lock) packages)"
