"""Validate docker/k8s offline: every manifest against the Kubernetes API schemas, strictly.

Run by `make k8s-validate` with the interpreter of .venv-k8s, which has kubernetes-validate (PyPI): the
OpenAPI schemas of Kubernetes 1.25..1.37 as JSON Schema, in "strict" form, where an unknown field is an
error. Nothing here talks to a cluster.

* Each document of each file (kustomization.yaml's resources and extras/) is checked against every
  version in --versions, and every error is listed (kubernetes-validate's own validate() stops at the
  first). A kind/apiVersion without a schema is an error too (its CLI only warns, so a typo in `kind`
  would pass).
* Where kubectl is installed, `kubectl kustomize` renders the kustomization offline (it needs no
  cluster) and the rendered objects are checked as well, and must be the same set as the files'.
  (`kubectl apply --dry-run=client` is no use here: it asks an API server for discovery and schemas.)

The consistency of the manifests with each other and with the server (ports, DNS names, probes,
volumes, CLI arguments) is tests/unit/test_k8s_manifests.py.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from kubernetes_validate import utils as kv
from kubernetes_validate.version import __version__ as kv_version
from packaging.version import Version
from referencing import Registry, Resource

HERE = Path(__file__).resolve().parent
DEFAULT_VERSIONS = "1.30,1.31,1.32,1.33,1.34,1.35,1.36,1.37"  # 1.30: lifecycle preStop `sleep` (beta, on)


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def key(obj: dict[str, Any]) -> tuple[str, str, str]:
    return (obj.get("apiVersion", ""), obj.get("kind", ""), obj.get("metadata", {}).get("name", ""))


def schema_errors(obj: dict[str, Any], version: str) -> list[str]:
    """Every schema error of ``obj`` (kubernetes-validate's validate() raises only the best match)."""
    # The same schema lookup as kubernetes_validate.utils.validate (pinned: kubernetes-validate==1.37.0).
    schema_version = [v for v in kv.all_versions() if Version(v) <= Version(version + ".0")][-1]
    api_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", str(obj.get("apiVersion", "")))
    schema_dir = f"kubernetes-json-schema/v{schema_version}-local-strict"
    try:
        schema = kv.schema_contents(f"{schema_dir}/{str(obj.get('kind', '')).lower()}-{api_version}.json", version)
    except FileNotFoundError:
        return [f"no schema for kind {obj.get('kind')!r} of apiVersion {obj.get('apiVersion')!r}"]
    definitions = kv.schema_contents(f"{schema_dir}/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    validator = jsonschema.validators.Draft202012Validator(schema, registry=registry)
    out = []
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.path))):
        out.append(f"{'.'.join(str(p) for p in error.path) or '(top level)'}: {error.message}")
    return out


def check(obj: dict[str, Any], source: str, versions: list[str]) -> list[str]:
    name = "/".join(key(obj)[1:])
    return [f"{source}: {name} (Kubernetes {v}): {e}" for v in versions for e in schema_errors(obj, v)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=HERE, help="the manifests (default: this folder)")
    parser.add_argument("--versions", default=DEFAULT_VERSIONS, help=f"Kubernetes versions ({DEFAULT_VERSIONS})")
    args = parser.parse_args()
    started = time.perf_counter()
    versions = [v.strip() for v in args.versions.replace(" ", ",").split(",") if v.strip()]
    known = {kv.major_minor(v) for v in kv.all_versions()}
    versions = [kv.major_minor(v) for v in versions]
    missing = [v for v in versions if v not in known]
    if missing:
        print(f"kubernetes-validate {kv_version} has no schemas for {', '.join(missing)}; it has {sorted(known)}")
        return 2

    kustomization = yaml.safe_load((args.dir / "kustomization.yaml").read_text())
    files = [args.dir / r for r in kustomization.get("resources", [])]
    files += sorted((args.dir / "extras").glob("*.yaml"))
    errors: list[str] = []
    from_files: set[tuple[str, str, str]] = set()
    count = 0
    for path in files:
        source = str(path.relative_to(args.dir))
        try:
            objs = documents(path)
        except (OSError, yaml.YAMLError) as exc:
            errors.append(f"{source}: {exc}")
            continue
        for obj in objs:
            count += 1
            errors += check(obj, source, versions)
            if path.parent == args.dir:
                from_files.add(key(obj))

    kubectl = shutil.which("kubectl")
    rendered_note = "kubectl not found: the kustomize rendering was not checked"
    if kubectl:
        proc = subprocess.run(
            [kubectl, "kustomize", str(args.dir)], capture_output=True, text=True, timeout=120, check=False
        )
        if proc.returncode != 0:
            errors.append(f"kubectl kustomize {args.dir}: {proc.stderr.strip()}")
        else:
            rendered = [d for d in yaml.safe_load_all(proc.stdout) if d]
            for obj in rendered:
                errors += check(obj, "kubectl kustomize", versions)
            got = {key(o) for o in rendered}
            if got != from_files:
                errors.append(f"kubectl kustomize renders {sorted(got ^ from_files)} differently from the files")
            version = subprocess.run(
                [kubectl, "version", "--client"], capture_output=True, text=True, timeout=60, check=False
            ).stdout.split("\n")
            rendered_note = (
                f"kubectl kustomize rendered {len(rendered)} objects and they validate too "
                f"({'; '.join(v.strip() for v in version if v.strip())})"
            )

    for line in errors:
        print("ERROR", line)
    elapsed = time.perf_counter() - started
    print(
        f"kubernetes-validate {kv_version}, strict, Kubernetes {', '.join(versions)}: {count} documents in "
        f"{len(files)} files, {len(errors)} error(s) ({elapsed:.1f} s)"
    )
    print(rendered_note if not errors or kubectl is None else "kubectl kustomize: see the errors above")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
