"""Consistency of the Kubernetes manifests in docker/k8s (no cluster, only PyYAML and our own code).

The schema check (every field known to a recent Kubernetes API, strictly) is `make k8s-validate`
(docker/k8s/validate.py, kubernetes-validate in .venv-k8s). This file checks what a schema cannot: that
the pieces fit each other and this server — selectors match labels, Service ports reach container
ports, the gateway's node_dns names are the workers' headless Services, probes use the V2 health
endpoints and ports that exist, every ConfigMap/Secret/PVC/volume referenced is there, the container
arguments parse with our CLI and the gateway config with our settings loader, pods run as non-root.
``check_manifests`` returns every problem found; the last tests break copies on purpose to show
that each kind of mistake is caught.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "docker" / "k8s"
NAMESPACE = "dl-inference"
CLUSTER_DOMAIN = "cluster.local"
# Secrets the operator creates (README "Kubernetes"): tokens are never committed.
EXTERNAL_SECRETS = {"dl-inference-auth"}
IMAGE = re.compile(r"^dl-inference/(gateway|worker-cpu|worker-gpu|worker-tensorflow|worker-itex):([A-Za-z0-9_.-]+)$")
LIVE, READY = "/v2/health/live", "/v2/health/ready"
WORKLOAD_KINDS = ("Deployment", "Pod")
PROBE_HANDLERS = ("httpGet", "grpc", "tcpSocket", "exec")


@dataclass
class Doc:
    file: str
    obj: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.obj.get("kind", ""))

    @property
    def name(self) -> str:
        return str(self.obj.get("metadata", {}).get("name", ""))

    @property
    def ref(self) -> str:
        return f"{self.file}: {self.kind}/{self.name}"


def load_docs(directory: Path) -> tuple[dict[str, Any], list[Doc]]:
    """The kustomization and every document of every manifest file (extras/ included)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text()) or {}
    docs = []
    for path in sorted(directory.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for obj in yaml.safe_load_all(path.read_text()):
            if obj:
                docs.append(Doc(str(path.relative_to(directory)), obj))
    return kustomization, docs


def pod_spec(doc: Doc) -> dict[str, Any] | None:
    if doc.kind == "Deployment":
        return doc.obj["spec"]["template"]["spec"]
    if doc.kind == "Pod":
        return doc.obj["spec"]
    return None


def pod_labels(doc: Doc) -> dict[str, str]:
    if doc.kind == "Deployment":
        return doc.obj["spec"]["template"].get("metadata", {}).get("labels", {}) or {}
    return doc.obj.get("metadata", {}).get("labels", {}) or {}


def pod_annotations(doc: Doc) -> dict[str, str]:
    if doc.kind == "Deployment":
        return doc.obj["spec"]["template"].get("metadata", {}).get("annotations", {}) or {}
    return doc.obj.get("metadata", {}).get("annotations", {}) or {}


def containers(spec: dict[str, Any], init: bool = True) -> Iterator[dict[str, Any]]:
    yield from spec.get("containers", []) or []
    if init:
        yield from spec.get("initContainers", []) or []


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """matchLabels semantics (the manifests use no matchExpressions; check_manifests says so if they do)."""
    wanted = (selector or {}).get("matchLabels") or {}
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def option(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return str(args[i + 1])
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def container_port(container: dict[str, Any], port: Any) -> int | None:
    """The port number a probe or Service targetPort (name or number) means in this container."""
    for p in container.get("ports", []) or []:
        if port == p.get("name") or port == p.get("containerPort"):
            return int(p["containerPort"])
    return None


def quantity(text: Any) -> float:
    """A Kubernetes quantity (cpu or memory) as a number."""
    s = str(text)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for unit in sorted(units, key=len, reverse=True):
        if s.endswith(unit):
            return float(s[: -len(unit)]) * units[unit]
    return float(s)


def gateway_config(docs: list[Doc]) -> tuple[dict[str, Any], Doc | None]:
    """The server YAML the gateway Deployment reads (--config) and its Deployment."""
    for doc in docs:
        spec = pod_spec(doc)
        if spec is None or pod_labels(doc).get("app.kubernetes.io/component") != "gateway":
            continue
        for c in containers(spec, init=False):
            path = option(c.get("args", []) or [], "--config")
            source = file_source(spec, c, path, docs) if path else None
            if source and source[0] == "ConfigMap" and source[3] is not None:
                return yaml.safe_load(source[3]) or {}, doc
    return {}, None


def file_source(
    spec: dict[str, Any], container: dict[str, Any], path: str, docs: list[Doc]
) -> tuple[str, str, str, str | None] | None:
    """Where a file path inside a container comes from: (kind, object name, key, text if known)."""
    volumes = {v["name"]: v for v in spec.get("volumes", []) or []}
    for mount in container.get("volumeMounts", []) or []:
        root = mount["mountPath"].rstrip("/")
        if mount.get("subPath"):
            if path != root:
                continue
            key = mount["subPath"]
        elif path.startswith(root + "/"):
            key = path[len(root) + 1 :]
        else:
            continue
        volume = volumes.get(mount["name"], {})
        for kind, field, name_key in (("ConfigMap", "configMap", "name"), ("Secret", "secret", "secretName")):
            if field in volume:
                name = volume[field].get(name_key, "")
                items = volume[field].get("items")
                if items:
                    key = next((i["key"] for i in items if i["path"] == key), f"<no item with path {key}>")
                text = None
                for doc in docs:
                    if doc.kind == kind and doc.name == name:
                        text = (doc.obj.get("data") or doc.obj.get("stringData") or {}).get(key)
                return kind, name, key, text
        return "volume", mount["name"], key, None
    return None


def check_manifests(directory: Path) -> list[str]:
    problems: list[str] = []
    add = problems.append
    kustomization, docs = load_docs(directory)

    # -- files, names, namespace, labels ---------------------------------------------------------
    listed = kustomization.get("resources", []) or []
    for res in listed:
        if not (directory / res).is_file():
            add(f"kustomization.yaml lists {res}, which does not exist")
    for path in sorted(directory.glob("*.yaml")):
        if path.name != "kustomization.yaml" and path.name not in listed:
            add(f"{path.name} is not listed in kustomization.yaml resources (it would never be applied)")
    if kustomization.get("namespace") != NAMESPACE:
        add(f"kustomization.yaml namespace must be {NAMESPACE}")
    seen: dict[tuple[str, str], str] = {}
    for doc in docs:
        key = (doc.kind, doc.name)
        if key in seen:
            add(f"{doc.ref} is defined twice ({seen[key]})")
        seen[key] = doc.file
        labels = doc.obj.get("metadata", {}).get("labels", {}) or {}
        if labels.get("app.kubernetes.io/name") != "dl-inference":
            add(f"{doc.ref} lacks the label app.kubernetes.io/name: dl-inference")
        if doc.kind != "Namespace" and doc.obj.get("metadata", {}).get("namespace") != NAMESPACE:
            add(f"{doc.ref} is not in namespace {NAMESPACE}")
    if ("Namespace", NAMESPACE) not in seen:
        add(f"no Namespace {NAMESPACE}")

    def named(kind: str, name: str) -> Doc | None:
        return next((d for d in docs if d.kind == kind and d.name == name), None)

    deployments = [d for d in docs if d.kind == "Deployment"]
    workloads = [d for d in docs if d.kind in WORKLOAD_KINDS]
    services = [d for d in docs if d.kind == "Service"]

    def selected(selector: dict[str, Any] | None) -> list[Doc]:
        if selector and "matchExpressions" in selector:
            add("a selector uses matchExpressions, which these checks do not understand")
        return [d for d in deployments if selects(selector, pod_labels(d))]

    # -- Deployments: selectors -------------------------------------------------------------------
    for dep in deployments:
        selector = dep.obj["spec"].get("selector", {})
        if not selects(selector, pod_labels(dep)):
            add(f"{dep.ref}: spec.selector does not match its own pod template labels")
        others = [o.name for o in selected(selector) if o is not dep]
        if others:
            add(f"{dep.ref}: its selector also matches the pods of {', '.join(others)}")

    # -- Services: selectors and ports ------------------------------------------------------------
    for svc in services:
        spec = svc.obj["spec"]
        targets = selected({"matchLabels": spec.get("selector", {})})
        if not targets:
            add(f"{svc.ref}: selector {spec.get('selector')} selects no Deployment's pods")
        for port in spec.get("ports", []) or []:
            target = port.get("targetPort", port["port"])
            for dep in targets:
                if not any(container_port(c, target) for c in containers(pod_spec(dep) or {}, init=False)):
                    add(f"{svc.ref}: port {port['port']} targets {target!r}, which no container of {dep.name} has")

    # -- every workload's pod spec ----------------------------------------------------------------
    tags: set[str] = set()
    for doc in workloads:
        spec = pod_spec(doc) or {}
        for field in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(field):
                add(f"{doc.ref}: {field} is set")
        psc = spec.get("securityContext", {}) or {}
        if psc.get("runAsNonRoot") is not True:
            add(f"{doc.ref}: pod securityContext.runAsNonRoot must be true (runs as root otherwise)")
        if psc.get("runAsUser", 1) == 0 or psc.get("runAsGroup", 1) == 0:
            add(f"{doc.ref}: pod runs as root (uid or gid 0)")
        if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            add(f"{doc.ref}: pod seccompProfile must be RuntimeDefault (Pod Security 'restricted')")
        volumes = {v["name"]: v for v in spec.get("volumes", []) or []}
        used: set[str] = set()
        for name, volume in volumes.items():
            if "hostPath" in volume:
                add(f"{doc.ref}: volume {name} is a hostPath")
            if "configMap" in volume and not named("ConfigMap", volume["configMap"]["name"]):
                if not volume["configMap"].get("optional"):
                    add(f"{doc.ref}: volume {name} needs ConfigMap {volume['configMap']['name']}, which is not defined")
            if "secret" in volume:
                secret = volume["secret"]["secretName"]
                if not (named("Secret", secret) or secret in EXTERNAL_SECRETS or volume["secret"].get("optional")):
                    add(f"{doc.ref}: volume {name} needs Secret {secret}: define it, mark it optional or external")
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                if not named("PersistentVolumeClaim", claim):
                    add(f"{doc.ref}: volume {name} needs PersistentVolumeClaim {claim}, which is not defined")
            source = volume.get("configMap")
            cm = named("ConfigMap", source["name"]) if source else None
            for item in (source or {}).get("items", []) or []:
                if cm and item["key"] not in (cm.obj.get("data") or {}):
                    add(f"{doc.ref}: volume {name} wants key {item['key']} of ConfigMap {cm.name}, which lacks it")
        for c in containers(spec):
            where = f"{doc.ref} container {c['name']}"
            image = str(c.get("image", ""))
            match = IMAGE.match(image)
            if not match:
                add(f"{where}: image {image!r} must be dl-inference/<gateway|worker-...>:<tag> with an explicit tag")
            elif match.group(2) == "latest":
                add(f"{where}: image {image} uses the tag 'latest'")
            else:
                tags.add(match.group(2))
            csc = c.get("securityContext", {}) or {}
            if csc.get("allowPrivilegeEscalation") is not False:
                add(f"{where}: securityContext.allowPrivilegeEscalation must be false")
            if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
                add(f"{where}: securityContext.capabilities.drop must include ALL")
            if csc.get("privileged") or csc.get("runAsUser") == 0 or csc.get("runAsNonRoot") is False:
                add(f"{where}: runs privileged or as root")
            if csc.get("readOnlyRootFilesystem") is not True:
                add(f"{where}: securityContext.readOnlyRootFilesystem should be true")
            mounts = c.get("volumeMounts", []) or []
            if not any(m["mountPath"] == "/tmp" and not m.get("readOnly") for m in mounts):
                add(f"{where}: no writable /tmp (the root filesystem is read-only)")
            for m in mounts:
                used.add(m["name"])
                if m["name"] not in volumes:
                    add(f"{where}: mounts volume {m['name']}, which the pod does not define")
            res = c.get("resources", {}) or {}
            for part in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in (res.get(part) or {}):
                        add(f"{where}: no {part}.{resource}")
            for resource in ("cpu", "memory"):
                req, lim = (res.get("requests") or {}).get(resource), (res.get("limits") or {}).get(resource)
                if req is not None and lim is not None and quantity(req) > quantity(lim):
                    add(f"{where}: {resource} request {req} is above its limit {lim}")
            if "nvidia.com/gpu" in (res.get("limits") or {}):
                tolerations = spec.get("tolerations", []) or []
                if not any(t.get("key") == "nvidia.com/gpu" for t in tolerations):
                    add(f"{where}: asks for a GPU but the pod does not tolerate the nvidia.com/gpu taint")
                if not spec.get("nodeSelector") and not spec.get("affinity"):
                    add(f"{where}: asks for a GPU but the pod has no nodeSelector/affinity for GPU nodes")
        for name in volumes:
            if name not in used:
                add(f"{doc.ref}: volume {name} is defined but mounted by no container")
        for tsc in spec.get("topologySpreadConstraints", []) or []:
            if not selects(tsc.get("labelSelector"), pod_labels(doc)):
                add(f"{doc.ref}: topologySpreadConstraints labelSelector does not match the pod's own labels")
    if len(tags) > 1:
        add(f"the dl-inference images use different tags: {', '.join(sorted(tags))}")

    # -- probes -----------------------------------------------------------------------------------
    for doc in deployments:
        spec = pod_spec(doc) or {}
        component = pod_labels(doc).get("app.kubernetes.io/component")
        for c in containers(spec, init=False):
            where = f"{doc.ref} container {c['name']}"
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = c.get(kind)
                if not probe:
                    add(f"{where}: no {kind}")
                    continue
                handlers = [h for h in PROBE_HANDLERS if h in probe]
                if len(handlers) != 1:
                    add(f"{where}: {kind} must have exactly one handler, has {handlers}")
                    continue
                handler = probe[handlers[0]]
                if handlers[0] == "httpGet":
                    path = handler.get("path")
                    want = {"livenessProbe": (LIVE,), "readinessProbe": (READY,), "startupProbe": (LIVE, READY)}[kind]
                    if path not in want:
                        add(f"{where}: {kind} path {path!r} must be the V2 health endpoint {' or '.join(want)}")
                    if not container_port(c, handler.get("port")):
                        add(f"{where}: {kind} port {handler.get('port')!r} is not a port of the container")
                elif handlers[0] == "grpc":
                    port = handler.get("port")
                    if not isinstance(port, int) or not container_port(c, port):
                        add(f"{where}: {kind} gRPC port {port!r} must be a container port number")
                    if handler.get("service", "") not in ("", "inference.GRPCInferenceService"):
                        add(f"{where}: {kind} asks grpc.health.v1 about service {handler['service']!r}")
                else:
                    add(f"{where}: {kind} uses {handlers[0]}; use the V2 health endpoints or grpc.health.v1")
            if component == "gateway" and any("grpc" in (c.get(k) or {}) for k in ("livenessProbe", "readinessProbe")):
                add(f"{where}: the gateway's liveness/readiness must be the HTTP V2 health endpoints")

    # -- gateway config: ports, files, DNS discovery ----------------------------------------------
    config, gateway = gateway_config(docs)
    if gateway is None:
        add("no gateway Deployment reading its --config from a ConfigMap")
    else:
        spec = pod_spec(gateway) or {}
        main = next(iter(containers(spec, init=False)))
        for key, port_name in (("http_port", "http"), ("grpc_port", "grpc"), ("metrics_port", "metrics")):
            if container_port(main, port_name) != config.get(key):
                add(f"{gateway.ref}: container port {port_name} is not the config's {key} ({config.get(key)})")
        annotations = pod_annotations(gateway)
        if annotations.get("prometheus.io/scrape") == "true":
            if annotations.get("prometheus.io/port") != str(config.get("metrics_port")):
                add(f"{gateway.ref}: prometheus.io/port is not the config's metrics_port")
            if annotations.get("prometheus.io/path") != "/metrics":
                add(f"{gateway.ref}: prometheus.io/path must be /metrics")
        files = [config.get("model_repository", "")]
        files += [(config.get("auth") or {}).get(k) for k in ("tokens_file", "admin_tokens_file")]
        files += [(config.get("tls") or {}).get(k) for k in ("cert", "key", "ca")]
        files += [config.get("node_file")]
        for path in filter(None, files):
            mounted = any(
                path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
                for m in main.get("volumeMounts", []) or []
            )
            source = file_source(spec, main, path, docs)
            if not mounted:
                add(f"{gateway.ref}: the config names {path}, which no volume of the gateway container provides")
            elif source and source[0] == "Secret" and source[1] not in EXTERNAL_SECRETS and source[3] is None:
                add(f"{gateway.ref}: {path} should come from Secret {source[1]} key {source[2]}, which lacks it")
        balancer = config.get("balancer") or {}
        drain = float(balancer.get("drain_delay_s", 0)) + float(config.get("stop_grace_s", 10))
        if spec.get("terminationGracePeriodSeconds", 30) <= drain:
            add(f"{gateway.ref}: terminationGracePeriodSeconds must exceed drain_delay_s + stop_grace_s ({drain:g} s)")

    # The workers: each headless Service in front of worker pods is one node_dns entry, and back.
    dns = {}
    for entry in config.get("node_dns", []) or []:
        if isinstance(entry, str):
            host, _, port = entry.rpartition(":")
            entry = {"name": host, "port": int(port)}
        dns[entry["name"].rstrip(".")] = entry
    worker_services = set()
    for svc in services:
        targets = selected({"matchLabels": svc.obj["spec"].get("selector", {})})
        if not any(pod_labels(d).get("app.kubernetes.io/component") == "worker" for d in targets):
            continue
        fqdn = f"{svc.name}.{NAMESPACE}.svc.{CLUSTER_DOMAIN}"
        worker_services.add(fqdn)
        if svc.obj["spec"].get("clusterIP") != "None":
            add(f"{svc.ref}: a worker Service must be headless (clusterIP: None), one DNS record per pod")
        entry = dns.get(fqdn)
        if entry is None:
            add(f"{svc.ref}: the gateway config's node_dns has no entry {fqdn}; the gateway never finds these workers")
            continue
        ports = {p["port"]: p.get("targetPort", p["port"]) for p in svc.obj["spec"].get("ports", []) or []}
        if int(entry["port"]) not in ports:
            add(f"{svc.ref}: node_dns port {entry['port']} is not a port of the Service")
        for dep in targets:
            worker = next(iter(containers(pod_spec(dep) or {}, init=False)))
            args = [str(a) for a in worker.get("args", []) or []]
            grpc_port = option(args, "--grpc-port")
            target = ports.get(int(entry["port"]))
            if grpc_port is None or container_port(worker, target) != int(grpc_port):
                add(f"{dep.ref}: node_dns port {entry['port']} does not reach the worker's --grpc-port {grpc_port}")
            model = option(args, "--model")
            if entry.get("models") and model not in entry["models"]:
                add(f"{dep.ref}: serves --model {model}, but node_dns {fqdn} lists models {entry['models']}")
            if pod_labels(dep).get("dl-inference/model") != model:
                add(f"{dep.ref}: label dl-inference/model is not its --model {model}")
    for name in dns:
        if name not in worker_services:
            add(f"gateway config node_dns {name} is not the headless Service of any worker Deployment")

    # -- workers: the conversion init container and the model repository ----------------------------
    for dep in deployments:
        if pod_labels(dep).get("app.kubernetes.io/component") != "worker":
            continue
        spec = pod_spec(dep) or {}
        worker = next(iter(containers(spec, init=False)))
        args = [str(a) for a in worker.get("args", []) or []]
        if args[:1] != ["worker"] or worker.get("command") != ["dl-inference"]:
            add(f"{dep.ref}: the worker container must run `dl-inference worker ...`")
        grpc_port = option(args, "--grpc-port")
        if grpc_port is None or container_port(worker, "grpc") != int(grpc_port):
            add(f"{dep.ref}: container port 'grpc' is not the worker's --grpc-port {grpc_port}")
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            port = ((worker.get(kind) or {}).get("grpc") or {}).get("port")
            if port is not None and str(port) != grpc_port:
                add(f"{dep.ref}: {kind} checks port {port}, not the worker's --grpc-port {grpc_port}")
        repo = option(args, "--model-repository") or ""
        repo_mount = next((m for m in worker.get("volumeMounts", []) or [] if m["mountPath"] == repo), None)
        if repo_mount is None:
            add(f"{dep.ref}: no volume is mounted at the worker's --model-repository {repo!r}")
            continue
        inits = [c for c in spec.get("initContainers", []) or [] if "dl-inference convert" in command_line(c)]
        if not inits:
            add(f"{dep.ref}: no init container runs `dl-inference convert`")
        for init in inits:
            line = command_line(init)
            mount = next((m for m in init.get("volumeMounts", []) or [] if m["name"] == repo_mount["name"]), None)
            if mount is None:
                add(f"{dep.ref}: init container {init['name']} does not mount the model repository volume")
                continue
            if "--into cache" in line:  # engines go to DL_INFERENCE_CACHE_DIR, which the worker must share
                cache = {c["name"]: env_value(c, "DL_INFERENCE_CACHE_DIR") for c in (init, worker)}
                if len(set(cache.values())) != 1 or None in cache.values():
                    add(f"{dep.ref}: init and worker containers need the same DL_INFERENCE_CACHE_DIR, have {cache}")
                else:
                    path = next(iter(cache.values()))
                    vols = [{m["name"] for m in c.get("volumeMounts", []) or [] if m["mountPath"] == path}
                            for c in (init, worker)]  # fmt: skip
                    if not vols[0] or vols[0] != vols[1]:
                        add(f"{dep.ref}: the engine cache {path} is not one volume shared by init and worker")
            else:  # converts into the repository itself: it needs write access
                volume = next(v for v in spec.get("volumes", []) or [] if v["name"] == repo_mount["name"])
                if mount.get("readOnly") or (volume.get("persistentVolumeClaim") or {}).get("readOnly"):
                    add(f"{dep.ref}: init container {init['name']} converts into a read-only model repository")
        if (spec.get("terminationGracePeriodSeconds", 30)) <= pre_stop_seconds(worker) + 5:
            add(f"{dep.ref}: terminationGracePeriodSeconds leaves no time after preStop for the worker to stop")

    # -- autoscaling, disruption budgets, network policy ------------------------------------------
    scaled: dict[str, int] = {}
    for hpa in (d for d in docs if d.kind == "HorizontalPodAutoscaler"):
        spec = hpa.obj["spec"]
        ref = spec["scaleTargetRef"]
        target = named(ref["kind"], ref["name"])
        if hpa.obj["apiVersion"] != "autoscaling/v2":
            add(f"{hpa.ref}: use autoscaling/v2")
        if target is None or ref.get("apiVersion") != "apps/v1":
            add(f"{hpa.ref}: scaleTargetRef {ref} names no Deployment here")
            continue
        lo, hi = spec.get("minReplicas", 1), spec["maxReplicas"]
        if not 1 <= lo <= hi:
            add(f"{hpa.ref}: minReplicas {lo} / maxReplicas {hi} are not 1 <= min <= max")
        scaled[target.name] = lo
        if "replicas" in target.obj["spec"]:
            add(f"{target.ref}: has replicas although {hpa.name} scales it (every apply would reset the HPA's choice)")
        for metric in spec.get("metrics", []) or []:
            name = (metric.get("resource") or {}).get("name")
            if metric.get("type") == "Resource" and name:
                for c in containers(pod_spec(target) or {}):
                    if name not in ((c.get("resources") or {}).get("requests") or {}):
                        add(f"{hpa.ref}: scales on {name} utilization but {c['name']} has no {name} request")
    for pdb in (d for d in docs if d.kind == "PodDisruptionBudget"):
        targets = selected(pdb.obj["spec"].get("selector"))
        if len(targets) != 1:
            add(f"{pdb.ref}: selector matches {len(targets)} Deployments, expected one")
        for dep in targets:
            replicas = scaled.get(dep.name, dep.obj["spec"].get("replicas", 1))
            min_available = pdb.obj["spec"].get("minAvailable")
            if isinstance(min_available, int) and min_available >= replicas:
                add(f"{pdb.ref}: minAvailable {min_available} >= {replicas} replicas blocks every node drain")
    for policy in (d for d in docs if d.kind == "NetworkPolicy"):
        spec = policy.obj["spec"]
        targets = selected(spec.get("podSelector"))
        if not targets:
            add(f"{policy.ref}: podSelector selects no pods")
        for rule in spec.get("ingress", []) or []:
            peers = [p for p in rule.get("from", []) or [] if "podSelector" in p]
            for peer in peers:
                if not selected(peer["podSelector"]):
                    add(f"{policy.ref}: an ingress rule allows pods {peer['podSelector']} that no Deployment has")
            for port in rule.get("ports", []) or []:
                for dep in targets:
                    if not any(container_port(c, port.get("port")) for c in containers(pod_spec(dep) or {}, False)):
                        add(f"{policy.ref}: allows port {port.get('port')}, which {dep.name} does not listen on")
        if "Ingress" in spec.get("policyTypes", []) and gateway is not None:
            for dep in targets:
                worker = next(iter(containers(pod_spec(dep) or {}, init=False)))
                grpc_port = option([str(a) for a in worker.get("args", []) or []], "--grpc-port")
                if grpc_port is None:
                    continue
                allowed = any(
                    any(selects(p.get("podSelector"), pod_labels(gateway)) for p in rule.get("from", []) or [])
                    and any(str(p.get("port")) in (grpc_port, "grpc") for p in rule.get("ports", []) or [])
                    for rule in spec.get("ingress", []) or []
                )
                if not allowed:
                    add(f"{policy.ref}: the gateway may not reach {dep.name} on its gRPC port {grpc_port}")
    return problems


def command_line(container: dict[str, Any]) -> str:
    return " ".join(str(a) for a in [*(container.get("command") or []), *(container.get("args") or [])])


def env_value(container: dict[str, Any], name: str) -> str | None:
    return next((e.get("value") for e in container.get("env", []) or [] if e["name"] == name), None)


def pre_stop_seconds(container: dict[str, Any]) -> int:
    return int((((container.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0))


# -- the manifests as committed ---------------------------------------------------------------------


def test_manifests_are_consistent() -> None:
    assert check_manifests(K8S_DIR) == []


def test_there_is_a_gateway_cpu_and_gpu_workers_hpa_pdb_and_network_policy() -> None:
    _, docs = load_docs(K8S_DIR)
    kinds = {d.kind for d in docs}
    wanted = {"Namespace", "ConfigMap", "Deployment", "Service", "PersistentVolumeClaim", "HorizontalPodAutoscaler"}
    assert wanted | {"PodDisruptionBudget", "NetworkPolicy"} <= kinds

    def gpus(doc: Doc) -> bool:
        limits = [(c.get("resources") or {}).get("limits") or {} for c in containers(pod_spec(doc) or {})]
        return any("nvidia.com/gpu" in lim for lim in limits)

    assert any(d.kind == "Deployment" and gpus(d) for d in docs), "a GPU worker Deployment"
    gateway = next(d for d in docs if d.kind == "Deployment" and d.name == "gateway")
    assert gateway.obj["spec"]["replicas"] >= 2
    service = next(d for d in docs if d.kind == "Service" and d.name == "gateway")
    metrics = next(d for d in docs if d.kind == "Service" and d.name == "gateway-metrics")
    assert {p["port"] for p in service.obj["spec"]["ports"]} == {8000, 8001}
    assert {p["port"] for p in metrics.obj["spec"]["ports"]} == {8002}


def test_gateway_config_loads_with_the_server_settings(tmp_path: Path) -> None:
    """The ConfigMap's server.yaml is accepted by the server's own loader (unknown keys, node_dns entries,
    balancer settings), with the in-pod paths pointed at local stand-ins."""
    from dl_inference.config import load_settings

    config, _ = gateway_config(load_docs(K8S_DIR)[1])
    assert config["node_dns"], "DNS discovery of the workers"
    (tmp_path / "models").mkdir()
    tokens = tmp_path / "tokens"
    tokens.write_text("an-inference-token-0123456789\n")
    config["model_repository"] = str(tmp_path / "models")
    config["auth"]["tokens_file"] = str(tokens)
    path = tmp_path / "server.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = load_settings(str(path), {})
    topology = settings.topology()
    assert {d.name for d in topology.dns} == {
        "worker-resnet50.dl-inference.svc.cluster.local",
        "worker-resnet50-trt.dl-inference.svc.cluster.local",
    }
    assert all(d.port == 8001 and len(d.models) == 1 for d in topology.dns)
    assert settings.balancer_settings().health_check == "grpc_health"
    assert settings.control_placement() == "disabled"


def _cli_invocations(container: dict[str, Any]) -> list[list[str]]:
    """`dl-inference ...` argument lists of a container: its command, or the lines of its sh -c script."""
    command = [str(a) for a in container.get("command") or []]
    args = [str(a) for a in container.get("args") or []]
    if command == ["dl-inference"]:
        return [args]
    if command[:1] == ["/bin/sh"]:
        out = []
        for line in " ".join(args).splitlines():
            words = shlex.split(line)
            if "dl-inference" in words:
                rest = words[words.index("dl-inference") + 1 :]
                out.append([re.sub(r"\$\{?\w+\}?", "X", w) for w in rest])
        return out
    return []


def test_container_commands_parse_with_the_cli() -> None:
    from dl_inference.cli import _parser

    parser = _parser()
    seen = set()
    for doc in load_docs(K8S_DIR)[1]:
        for c in containers(pod_spec(doc) or {}):
            for argv in _cli_invocations(c):
                try:
                    parser.parse_args(argv)
                except SystemExit:
                    pytest.fail(f"{doc.ref} container {c['name']}: `dl-inference {' '.join(argv)}` does not parse")
                seen.add(" ".join(argv[:2]))
    assert {"serve --config", "worker --model-repository", "convert repository", "convert tf-to-onnx"} <= seen


# -- broken copies: each mistake is caught ------------------------------------------------------------


def _edit(file: str, kind: str, name: str, change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        path = directory / file
        objs = [o for o in yaml.safe_load_all(path.read_text()) if o]
        hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
        assert hits, f"{file} has no {kind}/{name}"
        for obj in hits:
            change(obj)
        path.write_text(yaml.safe_dump_all(objs, sort_keys=False))

    return apply


def _container(obj: dict[str, Any], init: bool = False) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]["initContainers" if init else "containers"][0]


def _set_config(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def apply(cm: dict[str, Any]) -> None:
        config = yaml.safe_load(cm["data"]["server.yaml"])
        change(config)
        cm["data"]["server.yaml"] = yaml.safe_dump(config)

    return apply


def _drop_file_from_kustomization(directory: Path) -> None:
    path = directory / "kustomization.yaml"
    data = yaml.safe_load(path.read_text())
    data["resources"].remove("network-policy.yaml")
    path.write_text(yaml.safe_dump(data))


def _pod(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


GW, CPU, GPU, CFG = "gateway.yaml", "worker-resnet50.yaml", "worker-resnet50-trt.yaml", "gateway-config.yaml"
CPU_WORKER, GPU_WORKER = "worker-resnet50", "worker-resnet50-trt"
BREAKAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "service selector": (
        _edit(CPU, "Service", CPU_WORKER, lambda o: o["spec"]["selector"].update({"dl-inference/model": "x"})),
        "selects no Deployment",
    ),
    "deployment selector": (
        _edit(GW, "Deployment", "gateway", lambda o: o["spec"]["selector"]["matchLabels"].update({"tier": "x"})),
        "does not match its own pod template",
    ),
    "service target port": (
        _edit(GW, "Service", "gateway", lambda o: o["spec"]["ports"][0].update({"targetPort": "htp"})),
        "targets 'htp'",
    ),
    "not headless": (
        _edit(CPU, "Service", CPU_WORKER, lambda o: o["spec"].pop("clusterIP")),
        "must be headless",
    ),
    "readiness path": (
        _edit(GW, "Deployment", "gateway", lambda o: _container(o)["readinessProbe"]["httpGet"].update({"path": "/"})),
        "must be the V2 health endpoint",
    ),
    "liveness probe port": (
        _edit(GW, "Deployment", "gateway", lambda o: _container(o)["livenessProbe"]["httpGet"].update({"port": 9})),
        "is not a port of the container",
    ),
    "grpc probe port": (
        _edit(CPU, "Deployment", CPU_WORKER, lambda o: _container(o)["livenessProbe"]["grpc"].update({"port": 9})),
        "must be a container port number",
    ),
    "missing startup probe": (
        _edit(GPU, "Deployment", GPU_WORKER, lambda o: _container(o).pop("startupProbe")),
        "no startupProbe",
    ),
    "dns name typo": (
        _edit(CFG, "ConfigMap", "gateway-config", _set_config(lambda c: c["node_dns"][0].update({"name": "w.x"}))),
        "has no entry worker-resnet50.dl-inference.svc.cluster.local",
    ),
    "dns port": (
        _edit(CFG, "ConfigMap", "gateway-config", _set_config(lambda c: c["node_dns"][1].update({"port": 8000}))),
        "is not a port of the Service",
    ),
    "dns model": (
        _edit(CFG, "ConfigMap", "gateway-config", _set_config(lambda c: c["node_dns"][0].update({"models": ["m"]}))),
        "lists models ['m']",
    ),
    "worker grpc port": (
        _edit(CPU, "Deployment", CPU_WORKER, lambda o: _container(o)["args"].__setitem__(-1, "9001")),
        "container port 'grpc' is not the worker's --grpc-port 9001",
    ),
    "config metrics port": (
        _edit(CFG, "ConfigMap", "gateway-config", _set_config(lambda c: c.update({"metrics_port": 9090}))),
        "is not the config's metrics_port",
    ),
    "tokens file not mounted": (
        _edit(CFG, "ConfigMap", "gateway-config", _set_config(lambda c: c["auth"].update({"tokens_file": "/x/t"}))),
        "names /x/t, which no volume",
    ),
    "missing volume": (
        _edit(CPU, "Deployment", CPU_WORKER, lambda o: _pod(o)["volumes"].pop()),
        "mounts volume tmp, which the pod does not define",
    ),
    "missing configmap": (
        _edit(GW, "Deployment", "gateway", lambda o: _pod(o)["volumes"][0]["configMap"].update({"name": "gw"})),
        "needs ConfigMap gw",
    ),
    "missing secret": (
        _edit(GW, "Deployment", "gateway", lambda o: _pod(o)["volumes"][1]["secret"].update({"secretName": "s"})),
        "needs Secret s",
    ),
    "missing claim": (
        _edit(
            GPU,
            "Deployment",
            GPU_WORKER,
            lambda o: _pod(o)["volumes"][0]["persistentVolumeClaim"].update(claimName="m"),
        ),
        "needs PersistentVolumeClaim m",
    ),
    "image without tag": (
        _edit(GW, "Deployment", "gateway", lambda o: _container(o).update({"image": "dl-inference/gateway"})),
        "with an explicit tag",
    ),
    "latest tag": (
        _edit(CPU, "Deployment", CPU_WORKER, lambda o: _container(o).update(image="dl-inference/worker-cpu:latest")),
        "uses the tag 'latest'",
    ),
    "root": (
        _edit(CPU, "Deployment", CPU_WORKER, lambda o: _pod(o)["securityContext"].update(runAsNonRoot=False)),
        "runAsNonRoot must be true",
    ),
    "uid 0": (
        _edit(GW, "Deployment", "gateway", lambda o: _pod(o)["securityContext"].update(runAsUser=0)),
        "runs as root",
    ),
    "privilege escalation": (
        _edit(
            GPU,
            "Deployment",
            GPU_WORKER,
            lambda o: _container(o, True)["securityContext"].update(allowPrivilegeEscalation=True),
        ),
        "allowPrivilegeEscalation must be false",
    ),
    "no resources": (
        _edit(GW, "Deployment", "gateway", lambda o: _container(o).pop("resources")),
        "no requests.cpu",
    ),
    "gpu without toleration": (
        _edit(GPU, "Deployment", GPU_WORKER, lambda o: _pod(o).pop("tolerations")),
        "does not tolerate the nvidia.com/gpu taint",
    ),
    "hpa target": (
        _edit(CPU, "HorizontalPodAutoscaler", CPU_WORKER, lambda o: o["spec"]["scaleTargetRef"].update(name="w")),
        "names no Deployment",
    ),
    "hpa and replicas": (
        _edit(CPU, "Deployment", CPU_WORKER, lambda o: o["spec"].update({"replicas": 2})),
        "has replicas although",
    ),
    "pdb blocks drains": (
        _edit(GW, "PodDisruptionBudget", "gateway", lambda o: o["spec"].update({"minAvailable": 2})),
        "blocks every node drain",
    ),
    "network policy port": (
        _edit(
            "network-policy.yaml",
            "NetworkPolicy",
            "workers-from-gateway-only",
            lambda o: o["spec"]["ingress"][0]["ports"][0].update({"port": 8000}),
        ),
        "the gateway may not reach worker-resnet50 on its gRPC port 8001",
    ),
    "init container read-only": (
        _edit(CPU, "Deployment", CPU_WORKER, lambda o: _container(o, True)["volumeMounts"][0].update(readOnly=True)),
        "converts into a read-only model repository",
    ),
    "engine cache not shared": (
        _edit(GPU, "Deployment", GPU_WORKER, lambda o: _container(o)["env"][-1].update({"value": "/tmp/cache"})),
        "need the same DL_INFERENCE_CACHE_DIR",
    ),
    "grace period": (
        _edit(GW, "Deployment", "gateway", lambda o: _pod(o).update({"terminationGracePeriodSeconds": 10})),
        "must exceed drain_delay_s + stop_grace_s",
    ),
    "file not in kustomization": (_drop_file_from_kustomization, "network-policy.yaml is not listed"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_broken_copy_is_caught(breakage: str, tmp_path: Path) -> None:
    directory = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, directory)
    assert check_manifests(directory) == []  # the copy itself (re-dumped or not) is fine
    apply, expected = BREAKAGES[breakage]
    apply(directory)
    problems = check_manifests(directory)
    assert any(expected in p for p in problems), f"{breakage}: expected '{expected}' among {problems}"


def test_the_checks_do_not_depend_on_formatting(tmp_path: Path) -> None:
    """Re-dumping every file (comments and flow style gone) changes nothing the checks see."""
    directory = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, directory)
    for path in directory.rglob("*.yaml"):
        objs = [o for o in yaml.safe_load_all(path.read_text()) if o]
        path.write_text(yaml.safe_dump_all(copy.deepcopy(objs), sort_keys=True))
    assert check_manifests(directory) == []
