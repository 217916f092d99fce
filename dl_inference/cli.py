"""``dl-inference`` command line: serve, worker, make-examples, convert. Nothing runs at import time."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from dl_inference import __version__


def _setup_logging(level: str) -> None:
    worker = os.environ.get("DL_INFERENCE_WORKER")
    who = f"worker {worker}" if worker else "gateway"
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s [{who}] %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dl-inference", description="Multi-backend V2 inference server")
    p.add_argument("--version", action="version", version=f"dl-inference {__version__}")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway and one worker process per model instance")
    s.add_argument("--model-repository", help="model repository directory")
    s.add_argument("--http-port", type=int)
    s.add_argument("--grpc-port", type=int)
    s.add_argument("--metrics-port", type=int, help="Prometheus metrics port (0 disables)")
    s.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    s.add_argument("--model-control-mode", choices=("none", "poll", "explicit"))
    s.add_argument("--load-model", action="append", dest="load_models", help="explicit mode: load at start")
    s.add_argument("--repository-poll-secs", type=float)
    s.add_argument("--max-request-bytes", type=int, help="largest request accepted (default 96 MiB)")
    s.add_argument(
        "--node", action="append", dest="nodes", metavar="HOST:PORT[@WEIGHT]",
        help="a remote V2 gRPC node to balance onto (repeatable; replaces the config's nodes)",
    )  # fmt: skip
    s.add_argument("--node-file", help="node list file, re-read when it changes")
    s.add_argument("--balancer-policy", choices=("least_request", "weighted_round_robin"))
    s.add_argument("--config", help="server settings YAML (flags override it)")

    from dl_inference.worker.main import add_arguments

    w = sub.add_parser("worker", help="serve one model instance (standalone: V2 gRPC on --grpc-port)")
    add_arguments(w)

    e = sub.add_parser("make-examples", help="write the example models into a repository directory")
    e.add_argument("directory")

    c = sub.add_parser("convert", help="convert a model from another framework to ONNX")
    csub = c.add_subparsers(dest="framework", required=True)
    cc = csub.add_parser("caffe", help="Caffe deploy prototxt + caffemodel -> ONNX with Caffe's outputs")
    cc.add_argument("--prototxt", required=True, help="deploy .prototxt")
    cc.add_argument("--caffemodel", help="trained weights (.caffemodel); without it, only weightless nets")
    cc.add_argument("-o", "--output", required=True, help="ONNX file to write")
    cc.add_argument(
        "--batch-dynamic", action=argparse.BooleanOptionalAction, default=True,
        help="make the batch dimension of inputs/outputs symbolic (default: on)",
    )  # fmt: skip
    cc.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    return p


def _convert(args: argparse.Namespace) -> int:
    from dl_inference.convert.caffe.to_onnx import convert_caffe
    from dl_inference.errors import ServerError

    try:
        model = convert_caffe(
            args.prototxt, args.caffemodel, args.output, dynamic_batch=args.batch_dynamic, opset=args.opset
        )
    except ServerError as exc:
        print(f"dl-inference: {exc.message}", file=sys.stderr)
        return 2
    ins = ", ".join(i.name for i in model.graph.input)
    outs = ", ".join(o.name for o in model.graph.output)
    print(f"wrote {args.output}: {len(model.graph.node)} nodes, inputs [{ins}], outputs [{outs}]")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from dl_inference.errors import ServerError

    if args.command == "worker":
        _setup_logging(args.log_level or "INFO")
        from dl_inference.worker.main import main as worker_main

        return worker_main(args)
    if args.command == "convert":
        _setup_logging(args.log_level or "INFO")
        return _convert(args)
    if args.command == "make-examples":
        _setup_logging(args.log_level or "INFO")
        from dl_inference.examples import make_example_repository

        names = make_example_repository(Path(args.directory))
        print(f"wrote {len(names)} example models to {args.directory}: {', '.join(names)}")
        return 0

    from dl_inference.config import load_settings

    overrides = {
        k: getattr(args, k)
        for k in (
            "model_repository", "http_port", "grpc_port", "metrics_port", "host", "model_control_mode",
            "load_models", "repository_poll_secs", "max_request_bytes", "nodes", "node_file",
        )
    }  # fmt: skip
    overrides["log_level"] = args.log_level
    try:
        settings = load_settings(args.config, overrides)
        if args.balancer_policy:
            settings.balancer = {**settings.balancer, "policy": args.balancer_policy}
    except ServerError as exc:
        print(f"dl-inference: {exc.message}", file=sys.stderr)
        return 2
    _setup_logging(settings.log_level)
    from dl_inference.eventloop import run
    from dl_inference.gateway.server import serve

    return run(serve(settings))
