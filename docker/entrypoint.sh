#!/bin/sh
# Container entry point: start from an empty Prometheus multiprocess directory, then become the command
# (by default `python -m app`, which checks the settings and execs gunicorn, so gunicorn ends up as PID 1 and gets
# Docker's SIGTERM directly).
#
# Metric files left by an earlier run of this container (a restart keeps a non-tmpfs directory) would be
# merged into the new run's counters; `python -m app` wipes the directory too, this covers any other command.
set -eu

metrics_dir="${PROMETHEUS_MULTIPROC_DIR:-/tmp/reranker-metrics}"
if [ -d "$metrics_dir" ]; then
    # Clear the contents only: the directory itself may be a tmpfs mount point.
    find "$metrics_dir" -mindepth 1 -delete || {
        echo "entrypoint: cannot clear PROMETHEUS_MULTIPROC_DIR=$metrics_dir (uid $(id -u))" >&2
        exit 1
    }
else
    mkdir -p "$metrics_dir" || {
        echo "entrypoint: cannot create PROMETHEUS_MULTIPROC_DIR=$metrics_dir (uid $(id -u))" >&2
        exit 1
    }
fi

# Several models fetched by compose's model-fetch (MODEL_ID=name=org/model,name=org/model): served under their
# names from the folders the fetcher writes, unless RERANKER_MODELS says otherwise (app/fetch.py owns the layout).
case "${MODEL_ID:-}" in
    *=*)
        if [ -z "${RERANKER_MODELS:-}" ]; then
            RERANKER_MODELS="$(python -m app.fetch --print-served-models)" || exit 2
            export RERANKER_MODELS
        fi
        ;;
esac

if [ "$#" -eq 0 ]; then
    set -- python -m app
fi
exec "$@"
