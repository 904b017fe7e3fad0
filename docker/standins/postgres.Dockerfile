# syntax=docker/dockerfile:1
# A stand-in for the official postgres image, for the stack test on machines that cannot pull from docker.io:
# Debian's own PostgreSQL on the same Debian base as the project's images. It honours the parts of the
# official image's contract that compose.yaml uses: POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB, PGDATA at
# /var/lib/postgresql/data, and /docker-entrypoint-initdb.d/*.sql run once on a new data directory.
# Users keep the official image; only docker/standins/compose.yaml (the stack test's override) builds this.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
SHELL ["/bin/sh", "-eu", "-c"]
# uid/gid 999, as in the official image, fixed before the package would pick one
# hadolint ignore=DL3008
RUN groupadd --system --gid 999 postgres \
    && useradd --system --uid 999 --gid postgres --home-dir /var/lib/postgresql --shell /bin/sh postgres \
    && mkdir -p /etc/postgresql-common \
    && echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.conf \
    && apt-get update && apt-get install -y --no-install-recommends postgresql \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql /docker-entrypoint-initdb.d \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql \
    && ln -s /usr/lib/postgresql/*/bin /usr/lib/postgresql/bin
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV PGDATA=/var/lib/postgresql/data PATH=/usr/lib/postgresql/bin:$PATH LANG=C.UTF-8
USER 999
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["postgres"]
