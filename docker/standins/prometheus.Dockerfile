# A stand-in for the stack's Prometheus (docker.io/prom/prometheus, docker/compose.yaml), for the stack test on
# machines that cannot pull from docker.io: Debian's own `prometheus` package (2.42). It keeps the official image's
# contract: the binaries in /bin (bookworm's /bin is /usr/bin), the configuration at
# /etc/prometheus/prometheus.yml (compose mounts the stack's), the data in the /prometheus volume, port 9090, the
# same default flags, and the user nobody (65534). wget is there for the healthcheck, as busybox's is in the
# official image.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
SHELL ["/bin/sh", "-eu", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/* \
    && test -x /bin/prometheus && test -x /bin/promtool \
    && mkdir -p /prometheus && chown 65534:65534 /prometheus
USER 65534
EXPOSE 9090
VOLUME ["/prometheus"]
WORKDIR /prometheus
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", \
     "--web.console.libraries=/usr/share/prometheus/console_libraries", \
     "--web.console.templates=/usr/share/prometheus/consoles"]
