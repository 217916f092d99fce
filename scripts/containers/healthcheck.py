#!/opt/dl-inference/bin/python
"""Container health check on the V2 health endpoints: exit 0 when ready, 1 otherwise (Docker's HEALTHCHECK).

    dl-inference-healthcheck [TARGET]

TARGET (default: $DL_INFERENCE_HEALTHCHECK) is

* ``http://HOST:PORT/PATH``: a GET that must answer 200, e.g. the gateway's ``/v2/health/ready``;
* ``grpc://HOST:PORT``: grpc.health.v1 ``Check`` of the server ("") that must answer SERVING. A standalone
  ``dl-inference worker --grpc-port`` has no HTTP port; its health service says SERVING while its model is
  loaded (the same check Kubernetes' native gRPC probes make).

Plain HTTP and gRPC only: a server with TLS on these ports needs another check.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable

TIMEOUT_S = float(os.environ.get("DL_INFERENCE_HEALTHCHECK_TIMEOUT_S", "3"))


def check_http(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return "" if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"


def check_grpc(address: str) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return "" if status == "SERVING" else status


def main(argv: list[str]) -> int:
    target = argv[0] if argv else os.environ.get("DL_INFERENCE_HEALTHCHECK", "")
    check: Callable[[str], str]
    if target.startswith(("http://", "https://")):
        check = check_http
    elif target.startswith("grpc://"):
        check, target = check_grpc, target.removeprefix("grpc://")
    else:
        print(f"health check target must be http://... or grpc://HOST:PORT, got {target!r}", file=sys.stderr)
        return 1  # Docker reserves 2
    try:
        problem = check(target)
    except OSError as exc:
        problem = str(exc)
    if problem:
        print(f"{target}: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
