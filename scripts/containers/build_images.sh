#!/usr/bin/env bash
# Build dl-inference's images (docker/Dockerfile.*) with podman, tagged dl-inference/NAME:$DL_INFERENCE_TAG.
#
#   scripts/containers/build_images.sh [NAME ...]
#
# NAME: gateway, worker-cpu, worker-tensorflow (the default set: what docker-compose.yml runs by default),
# worker-itex, worker-gpu (needs CUDA_BASE_IMAGE from a registry: not buildable here), gpu-runtime-check (the GPU
# Dockerfile's `runtime` stage on the local Debian base, then removed: checks that stage's apt/user steps).
#
# Settings (environment):
#   DL_INFERENCE_TAG  image tag (0.1.0, the tag docker-compose.yml and docker/k8s use)
#   BASE_IMAGE        base of the CPU images (localhost/debian-python:bookworm: make_base_image.sh makes it)
#   BUILD_CA_DIR      mounted read-only over /etc/ssl/certs during the build's RUN steps, so that pip trusts the
#                     same CAs as this host (a TLS-intercepting proxy's CA, installed by update-ca-certificates)
#                     without baking them into a layer; default /etc/ssl/certs, empty: no mount
#   WHEELS_DIR        a host folder of wheels offered to the build (pip --find-links): the PyTorch CPU wheel
#                     where PyTorch's own index is unreachable; default $PIP_FIND_LINKS when it is a folder.
#                     With it, worker-cpu is built with TORCH_INDEX_URL empty unless TORCH_INDEX_URL is set.
#   CUDA_BASE_IMAGE   worker-gpu's base (its Dockerfile's default when unset)
#   BUILD_ARGS        extra `podman build` arguments, e.g. "--build-arg TORCH_REQUIREMENT=torch==2.13.0+cpu"
# podman's --volume at build time has no `docker build` equivalent; with Docker, build with
# `docker compose build` or `docker build` directly where no extra CA or local wheel is needed.
set -euo pipefail
cd "$(dirname "$0")/../.."

TAG=${DL_INFERENCE_TAG:-0.1.0}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-python:bookworm}
BUILD_CA_DIR=${BUILD_CA_DIR-/etc/ssl/certs}
default_wheels=${PIP_FIND_LINKS:-}
[[ -d $default_wheels ]] || default_wheels=
WHEELS_DIR=${WHEELS_DIR-$default_wheels}

images=("$@")
((${#images[@]})) || images=(gateway worker-cpu worker-tensorflow)

common=(--format docker --layers --build-arg "BASE_IMAGE=$BASE_IMAGE")
if [[ -n $BUILD_CA_DIR ]]; then
    common+=(--volume "$BUILD_CA_DIR:/etc/ssl/certs:ro")
fi
if [[ -n ${BUILD_ARGS:-} ]]; then
    # shellcheck disable=SC2206  # a list of words on purpose
    common+=($BUILD_ARGS)
fi

build() {  # NAME TARGET-TAG [extra podman build arguments...]
    local name=$1 tag=$2 started
    shift 2
    started=$(date +%s)
    echo "building $tag (docker/Dockerfile.$name)"
    podman build "${common[@]}" "$@" -f "docker/Dockerfile.${name}" -t "$tag" .
    echo "built $tag in $(($(date +%s) - started)) s, $(podman image inspect --format '{{.Size}}' "$tag" | numfmt --to=iec)"
}

for name in "${images[@]}"; do
    case $name in
        gateway | worker-tensorflow | worker-itex)
            build "$name" "dl-inference/$name:$TAG"
            ;;
        worker-cpu)
            extra=()
            if [[ -n $WHEELS_DIR ]]; then
                extra+=(--volume "$WHEELS_DIR:/host-wheels:ro" --build-arg WHEELS_DIR=/host-wheels
                        --build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL-}")
            elif [[ -n ${TORCH_INDEX_URL+set} ]]; then
                extra+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
            fi
            build "$name" "dl-inference/$name:$TAG" "${extra[@]}"
            ;;
        worker-gpu)
            extra=()
            if [[ -n ${CUDA_BASE_IMAGE:-} ]]; then
                extra+=(--build-arg "CUDA_BASE_IMAGE=$CUDA_BASE_IMAGE")
            fi
            build "$name" "dl-inference/$name:$TAG" "${extra[@]}"
            ;;
        gpu-runtime-check)
            # The GPU image's first stage on the Debian base instead of CUDA's: apt, Python, the uid-1000 user.
            tag=localhost/dl-inference/worker-gpu-runtime-check:$TAG
            podman build "${common[@]}" --build-arg "CUDA_BASE_IMAGE=$BASE_IMAGE" --target runtime \
                -f docker/Dockerfile.worker-gpu -t "$tag" .
            podman run --rm --user 1000:1000 "$tag" sh -c 'id && python3 -c "import venv, sys; print(sys.version)"'
            podman rmi "$tag" >/dev/null
            echo "worker-gpu's runtime stage built on $BASE_IMAGE (the pip stages need the CUDA base and NVIDIA's index)"
            ;;
        *)
            echo "unknown image '$name' (gateway, worker-cpu, worker-tensorflow, worker-itex, worker-gpu, gpu-runtime-check)" >&2
            exit 2
            ;;
    esac
done
