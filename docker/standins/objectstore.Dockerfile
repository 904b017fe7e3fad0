# syntax=docker/dockerfile:1
# A stand-in for the stack's object store (SeaweedFS, docker/compose.yaml), for the stack test on machines that
# cannot pull from docker.io: moto's standalone S3 server, as DVC's own S3 plugin tests its remote. It keeps
# the parts of the contract that the stack uses: the S3 API on port 8333, the buckets made by the buckets job,
# the keys from the environment (checked: objectstore.py), and data on the /data volume that
# survives down/up (objectstore.py replays moto's request recording). Build context: the project root.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
SHELL ["/bin/sh", "-eu", "-c"]
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 objectstore \
    && useradd --system --uid 10001 --gid objectstore --home-dir /data objectstore \
    && mkdir -p /data && chown objectstore:objectstore /data
COPY requirements.lock build-tools.txt /tmp/
RUN --mount=type=secret,id=ca_bundle,required=false \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi; \
    python3 -m venv /opt/moto \
    && /opt/moto/bin/pip install --no-cache-dir --timeout 120 --retries 10 -r /tmp/build-tools.txt \
    && /opt/moto/bin/pip install --no-cache-dir --timeout 120 --retries 10 --resume-retries 20 \
         -c /tmp/requirements.lock 'moto[server]' \
    && rm /tmp/requirements.lock /tmp/build-tools.txt
COPY docker/standins/objectstore.py /usr/local/bin/objectstore.py
ENV MOTO_ENABLE_RECORDING=1 MOTO_RECORDER_FILEPATH=/data/recording.jsonl
USER 10001
EXPOSE 8333
VOLUME ["/data"]
ENTRYPOINT ["/opt/moto/bin/python", "/usr/local/bin/objectstore.py"]
