#!/usr/bin/env bash
# Smoke test of the serving image with podman, on a machine without Docker or registry access:
#   1. a Debian base image made locally (debootstrap --variant=minbase + podman import), from the machine's
#      own apt mirror;
#   2. docker/Dockerfile.serve built on it (runc runtime, lowered ulimits, the host CA bundle as a build secret);
#   3. the container run with models/scratch mounted, /health and a real /predict checked from the host;
#   4. everything it made removed (KEEP_BASE=1 keeps the base image for the next run).
# Needs: podman, runc, debootstrap (Debian packages), and `dvc repro` done (models/scratch/model.onnx).
set -euo pipefail
cd "$(dirname "$0")/.."

model_dir=${MODEL_DIR:-models/scratch}
[ -f "$model_dir/model.onnx" ] || { echo "smoke: $model_dir/model.onnx is missing: run 'dvc repro' first" >&2; exit 1; }
for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null || { echo "smoke: $tool is not installed (apt-get install podman runc debootstrap)" >&2; exit 1; }
done

work=$(mktemp -d)
conf="$work/containers.conf"
cat > "$conf" <<CONF
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF="$conf"

suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list)
base="localhost/softmax-mlops-base:$suite"
image="localhost/softmax-mlops-serve:smoke"
container="softmax-mlops-smoke-$$"
port=${PORT:-18000}

dangling_before=$(podman images -q --filter dangling=true | sort)
cleanup() {
  podman rm -f "$container" >/dev/null 2>&1 || true
  podman rmi -f "$image" >/dev/null 2>&1 || true
  # the build stage's untagged image: remove only the ones this run created
  comm -13 <(echo "$dangling_before") <(podman images -q --filter dangling=true | sort) | xargs -r podman rmi -f >/dev/null 2>&1 || true
  [ "${KEEP_BASE:-0}" = 1 ] || podman rmi -f "$base" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

if ! podman image exists "$base"; then
  echo "== base image: debootstrap --variant=minbase $suite from $mirror"
  debootstrap --variant=minbase "$suite" "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  tar -C "$work/rootfs" -c . | podman import - "$base" >/dev/null
  rm -rf "$work/rootfs"
fi

echo "== build docker/Dockerfile.serve on $base"
ca_bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
podman build --format docker --network host --build-arg BASE_IMAGE="$base" --secret "id=ca_bundle,src=$ca_bundle" \
  -f docker/Dockerfile.serve -t "$image" . >"$work/build.log" 2>&1 || { tail -30 "$work/build.log" >&2; exit 1; }

echo "== run (model: $model_dir, port 127.0.0.1:$port)"
podman run -d --name "$container" -p "127.0.0.1:$port:8000" -v "$PWD/$model_dir:/models:ro" "$image" >/dev/null
for _ in $(seq 60); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  sleep 1
done
echo "GET /health -> $(curl -sf "http://127.0.0.1:$port/health")"

body=$(python3 - <<'PY'
import json, zipfile, io, struct
import numpy as np
with np.load("data/prepared/test.npz", allow_pickle=False) as npz:
    images, labels = npz["images"][:4], npz["labels"][:4]
print(json.dumps({"instances": images.tolist(), "labels": labels.tolist()}))
PY
)
response=$(curl -sf -X POST -H 'content-type: application/json' --data "$body" "http://127.0.0.1:$port/predict")
python3 - "$body" "$response" <<'PY'
import json, sys
labels = json.loads(sys.argv[1])["labels"]
predictions = json.loads(sys.argv[2])["predictions"]
got = [p["class_id"] for p in predictions]
print(f"POST /predict (4 test images) -> {[p['class_name'] for p in predictions]}; true labels {labels}")
assert len(got) == 4, "expected 4 predictions"
PY
user=$(podman exec "$container" id -u)
echo "container user id: $user (non-root: $([ "$user" != 0 ] && echo yes || echo NO))"
# podman schedules HEALTHCHECKs through systemd; without it, run the image's check once by hand
if podman healthcheck run "$container" >/dev/null 2>&1; then echo "HEALTHCHECK: healthy"; else echo "HEALTHCHECK: FAILED"; exit 1; fi
echo "== image sizes"
podman image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'softmax-mlops-(serve|base)'
echo "smoke: OK"
