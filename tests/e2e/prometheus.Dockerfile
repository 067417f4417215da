# A Prometheus server for the Docker end-to-end suite, built from Debian's `prometheus` package on the local
# base image (scripts/docker-setup.sh builds both), for machines that cannot pull prom/prometheus from Docker
# Hub. Same entry point and layout as prom/prometheus (config /etc/prometheus/prometheus.yml, data /prometheus,
# user nobody), so compose.yaml's monitoring profile runs it unchanged via PROMETHEUS_IMAGE.
ARG BASE_IMAGE=reranker-test-base:bookworm
FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
RUN set -eu; \
    apt-get update; \
    apt-get install -y --no-install-recommends prometheus; \
    rm -rf /var/lib/apt/lists/*; \
    mkdir -p /prometheus; \
    chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
