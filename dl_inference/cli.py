"""``dl-inference`` command line: serve, worker, make-examples, convert. Nothing runs at import time."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from dl_inference import __version__


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, process (gateway, frontend N, worker
    model:version#instance), logger, message, and the traceback when there is one."""

    def __init__(self, who: str) -> None:
        super().__init__()
        self.who = who

    def format(self, record: logging.LogRecord) -> str:
        import datetime
        import json

        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "process": self.who,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _setup_logging(level: str, log_format: str | None = None) -> None:
    """Logging to stderr; ``log_format`` text (default) or json, else ``$DL_INFERENCE_LOG_FORMAT`` (how
    ``serve --log-format json`` reaches the workers and frontends it starts)."""
    worker, frontend = os.environ.get("DL_INFERENCE_WORKER"), os.environ.get("DL_INFERENCE_FRONTEND")
    who = f"worker {worker}" if worker else f"frontend {frontend}" if frontend else "gateway"
    handler = logging.StreamHandler(sys.stderr)
    if (log_format or os.environ.get("DL_INFERENCE_LOG_FORMAT") or "text").lower() == "json":
        handler.setFormatter(JsonFormatter(who))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{who}] %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")


def _bool(text: str) -> bool:
    """Triton's boolean flag values: true/false, 1/0, yes/no, on/off."""
    from dl_inference.config import parse_bool

    try:
        return parse_bool(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dl-inference", description="Multi-backend V2 inference server")
    p.add_argument("--version", action="version", version=f"dl-inference {__version__}")
    p.add_argument("--log-level", default=None, type=str.upper, choices=LOG_LEVELS, help="DEBUG, INFO, WARNING, ERROR")
    p.add_argument("--log-format", default=None, choices=LOG_FORMATS, help="text (default) or json (object per line)")
    # also accepted after the command (``serve --log-level DEBUG``); SUPPRESS keeps the first one's value
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level", default=argparse.SUPPRESS, type=str.upper, choices=LOG_LEVELS, help="DEBUG, INFO, WARNING, ERROR"
    )
    common.add_argument("--log-format", default=argparse.SUPPRESS, choices=LOG_FORMATS, help="text or json")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", parents=[common], help="run the gateway and one worker process per model instance")
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
        "--max-inflight-requests", type=int,
        help="requests the gateway holds at once, all models; more are answered 429 (default 0: no limit)",
    )  # fmt: skip
    s.add_argument(
        "--node", action="append", dest="nodes", metavar="HOST:PORT[@WEIGHT]",
        help="a remote V2 gRPC node to balance onto (repeatable; replaces the config's nodes)",
    )  # fmt: skip
    s.add_argument("--node-file", help="node list file, re-read when it changes")
    s.add_argument("--balancer-policy", choices=("least_request", "weighted_round_robin"))
    s.add_argument("--auth-token-file", help="inference tokens, one per line: clients send 'Authorization: Bearer'")
    s.add_argument("--admin-token-file", help="model-control tokens, one per line")
    s.add_argument("--tls-cert", help="PEM certificate chain: HTTPS and gRPC over TLS (with --tls-key)")
    s.add_argument("--tls-key", help="PEM private key of --tls-cert")
    s.add_argument("--tls-ca", help="PEM CA: clients must present a certificate it signed (mutual TLS)")
    s.add_argument("--node-token-file", help="file with the token this gateway sends its nodes (Authorization: Bearer)")
    s.add_argument("--node-tls-ca", help="PEM CA that signed the nodes' certificates: call nodes over TLS")
    s.add_argument("--node-tls-cert", help="PEM client certificate for nodes that require one (with --node-tls-key)")
    s.add_argument("--node-tls-key", help="PEM private key of --node-tls-cert")
    s.add_argument("--node-tls-server-name", help="check the nodes' certificates for this name, not their address")
    s.add_argument("--control-api", choices=("enabled", "disabled"), help="model control (load/unload/index)")
    s.add_argument("--control-port", type=int, help="serve model control only on this HTTP port (127.0.0.1)")
    s.add_argument(
        "--worker-environment", action="append", dest="worker_environments", metavar="NAME=PYTHON",
        help="a Python interpreter for the workers of models whose config says worker_environment: NAME "
        "(repeatable; adds to or replaces by name the config's worker_environments)",
    )  # fmt: skip
    s.add_argument(
        "--frontends", type=int, help="processes serving the gRPC and HTTP ports (Linux; default: cores/4, at most 8)"
    )
    s.add_argument(
        "--exit-on-error", type=_bool, nargs="?", const=True, metavar="BOOL",
        help="exit when a model fails to load at start (default true, as Triton; =false serves the others)",
    )  # fmt: skip
    s.add_argument(
        "--strict-readiness", type=_bool, nargs="?", const=True, metavar="BOOL",
        help="ready only while every model is ready (default true, as Triton; =false: ready once started)",
    )  # fmt: skip
    s.add_argument(
        "--disable-auto-complete-config", action="store_const", const=True, default=None,
        help="take each config as written: it must list its inputs and outputs, and nothing is filled in",
    )  # fmt: skip
    s.add_argument("--config", help="server settings YAML (flags override it)")

    f = sub.add_parser("frontend", parents=[common])  # started by `serve --frontends N`; no help: internal
    f.add_argument("--control", required=True)
    f.add_argument("--index", type=int, required=True)
    from dl_inference.worker.main import add_arguments

    w = sub.add_parser("worker", parents=[common], help="serve one model instance (standalone: V2 gRPC on --grpc-port)")
    add_arguments(w)

    e = sub.add_parser("make-examples", parents=[common], help="write the example models into a repository directory")
    e.add_argument("directory")
    e.add_argument(
        "--tensorflow", action=argparse.BooleanOptionalAction, default=None,
        help="also write the TensorFlow SavedModel examples (default: when TensorFlow is installed)",
    )  # fmt: skip

    c = sub.add_parser(
        "convert", help="convert models: Caffe -> ONNX, TensorFlow -> ONNX, ONNX -> TensorRT, a whole repository"
    )
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
    _add_tensorrt_commands(csub)
    from dl_inference.convert.tensorflow.command import add_arguments as add_tf_to_onnx_arguments

    add_tf_to_onnx_arguments(
        csub.add_parser(
            "tf-to-onnx",
            help="TensorFlow SavedModel -> ONNX (tf2onnx), checked against TensorFlow's outputs; needs TensorFlow",
        )
    )
    return p


def _add_tensorrt_commands(csub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ct = csub.add_parser(
        "onnx-to-tensorrt",
        help="ONNX -> TensorRT engine (model.plan + model.plan.json metadata); needs TensorRT and a GPU",
    )
    ct.add_argument("--onnx", required=True, help="ONNX model to build from")
    ct.add_argument("-o", "--output", required=True, help="engine file to write (metadata goes to OUTPUT.json)")
    ct.add_argument(
        "--max-batch-size", type=int, default=None,
        help="largest batch (profile max; min is 1); default 8 when every input and output has a dynamic "
        "first dimension, else 0 (no batching)",
    )  # fmt: skip
    ct.add_argument("--opt-batch", type=int, help="batch size TensorRT tunes for (default: --max-batch-size)")
    precision = ct.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="TensorRT 10: allow FP16 kernels")
    precision.add_argument("--int8", action="store_true", help="TensorRT 10: INT8 (+FP16) with entropy calibration")
    precision.add_argument(
        "--strongly-typed", action="store_true", help="precision from the ONNX itself (FP16 / Q/DQ models; TensorRT 11)"
    )
    ct.add_argument("--calibration-dir", help="--int8: folder of .npy/.npz calibration samples")
    ct.add_argument("--calibration-batch-size", type=int, help="--int8: rows per calibration batch (default <= 8)")
    ct.add_argument("--workspace-mb", type=int, help="builder workspace limit in MiB (default: TensorRT's)")
    ct.add_argument("--timing-cache", help="timing cache file (default: one per GPU and TensorRT in the cache dir)")
    ct.add_argument(
        "--shape", action="append", default=[], metavar="NAME:DIMS[:OPT:MAX]",
        help="shape of an input's non-batch dimensions, e.g. image:3x224x224 or tokens:1:128:512 (repeatable)",
    )  # fmt: skip
    ct.add_argument("--device-id", type=int, default=0, help="GPU to build on (default 0)")

    cr = csub.add_parser(
        "repository",
        help="build the TensorRT engines a model repository's configs ask for (the init step before serve)",
    )
    cr.add_argument("--model-repository", required=True, help="model repository directory")
    cr.add_argument("--target", choices=("tensorrt",), default="tensorrt", help="what to build (default tensorrt)")
    cr.add_argument(
        "--into", choices=("version", "cache"), default="version",
        help="write model.plan into each version directory (default) or into the engine cache (read-only repos)",
    )  # fmt: skip
    cr.add_argument("--dry-run", action="store_true", help="only print what would be built (no TensorRT needed)")
    cr.add_argument("--device-id", type=int, default=0, help="GPU to build on (default 0)")


def _emit(line: str) -> None:
    print(line, flush=True)


def _convert_onnx_to_tensorrt(args: argparse.Namespace) -> int:
    from dl_inference.convert.tensorrt.builder import import_tensorrt
    from dl_inference.convert.tensorrt.pipeline import convert_onnx_file
    from dl_inference.convert.tensorrt.settings import BuildSettings, batchable, onnx_io, parse_shape_specs
    from dl_inference.errors import ServerError

    onnx_path = Path(args.onnx)
    try:
        trt = import_tensorrt()  # first: nothing below can happen without it
        inputs, outputs = onnx_io(onnx_path)
        max_batch = args.max_batch_size
        if max_batch is None:
            max_batch = 8 if batchable(inputs, outputs) else 0
        precision = "fp16" if args.fp16 else "int8" if args.int8 else "typed" if args.strongly_typed else "fp32"
        settings = BuildSettings(
            max_batch_size=max_batch,
            opt_batch_size=args.opt_batch,
            precision=precision,
            workspace_mb=args.workspace_mb,
            shapes=parse_shape_specs(args.shape),
            calibration_dir=Path(args.calibration_dir) if args.calibration_dir else None,
            calibration_batch_size=args.calibration_batch_size,
            timing_cache=Path(args.timing_cache) if args.timing_cache else None,
        )
        meta = convert_onnx_file(onnx_path, Path(args.output), settings, _emit, device_id=args.device_id, trt=trt)
    except ServerError as exc:
        print(f"dl-inference: {exc.message}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.output} ({meta['plan_bytes'] / 1e6:.1f} MB, {meta['precision']}, "
        f"max batch {meta['max_batch_size']}) "
        f"for TensorRT {meta['tensorrt_version']} on {meta['gpu_name']} ({meta['compute_capability']}) "
        f"in {meta['build_seconds']:.1f} s; metadata in {args.output}.json"
    )
    return 0


def _convert_repository(args: argparse.Namespace) -> int:
    from dl_inference.convert.tensorrt.repository import plan_repository, run_conversion
    from dl_inference.errors import ServerError

    try:
        planned, summary = plan_repository(Path(args.model_repository), into=args.into)
        dry = " (dry run)" if args.dry_run else ""
        _emit(f"{len(planned)} TensorRT model version(s) in {args.model_repository}{dry}")
        summary = run_conversion(planned, summary, _emit, dry_run=args.dry_run, device_id=args.device_id)
    except ServerError as exc:
        print(f"dl-inference: {exc.message}", file=sys.stderr)
        return 2
    for line in summary.lines():
        _emit(line)
    return summary.exit_code


def _convert(args: argparse.Namespace) -> int:
    if args.framework == "tf-to-onnx":
        from dl_inference.convert.tensorflow.command import run as run_tf_to_onnx

        return run_tf_to_onnx(args, _emit)
    if args.framework == "onnx-to-tensorrt":
        return _convert_onnx_to_tensorrt(args)
    if args.framework == "repository":
        return _convert_repository(args)
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

    if args.command in ("serve", "frontend", "worker"):  # the processes that move request bytes
        from dl_inference.memtrim import tune_malloc

        tune_malloc()

    if args.command == "worker":
        _setup_logging(args.log_level or "INFO", args.log_format)
        from dl_inference.worker.main import main as worker_main

        return worker_main(args)
    if args.command == "convert":
        _setup_logging(args.log_level or "INFO", args.log_format)
        return _convert(args)
    if args.command == "frontend":
        _setup_logging(args.log_level or "INFO", args.log_format)
        from dl_inference.eventloop import run
        from dl_inference.gateway.frontend_processes import run_frontend

        return run(run_frontend(args.control, args.index))
    if args.command == "make-examples":
        _setup_logging(args.log_level or "INFO", args.log_format)
        from dl_inference.examples import make_example_repository

        names = make_example_repository(Path(args.directory))
        from dl_inference.examples_tensorflow import make_tensorflow_examples, tensorflow_available

        if args.tensorflow or (args.tensorflow is None and tensorflow_available()):
            names += make_tensorflow_examples(Path(args.directory))
        print(f"wrote {len(names)} example models to {args.directory}: {', '.join(names)}")
        return 0

    from dl_inference.config import load_settings

    overrides = {
        k: getattr(args, k)
        for k in (
            "model_repository", "http_port", "grpc_port", "metrics_port", "host", "model_control_mode",
            "load_models", "repository_poll_secs", "max_request_bytes", "max_inflight_requests", "nodes", "node_file",
            "control_api", "control_port", "frontends", "exit_on_error", "strict_readiness",
            "disable_auto_complete_config",
        )
    }  # fmt: skip
    overrides["log_level"] = args.log_level
    overrides["log_format"] = args.log_format
    try:
        settings = load_settings(args.config, overrides)
        if args.balancer_policy:
            settings.balancer = {**settings.balancer, "policy": args.balancer_policy}
        if args.auth_token_file or args.admin_token_file:
            auth = dict(settings.auth)
            if args.auth_token_file:
                auth["tokens_file"] = args.auth_token_file
            if args.admin_token_file:
                auth["admin_tokens_file"] = args.admin_token_file
            settings.auth = auth
        tls = {k: v for k, v in (("cert", args.tls_cert), ("key", args.tls_key), ("ca", args.tls_ca)) if v}
        if tls:
            settings.tls = {**settings.tls, **tls}
        node_flags = (
            ("token_file", args.node_token_file), ("tls_ca", args.node_tls_ca), ("tls_cert", args.node_tls_cert),
            ("tls_key", args.node_tls_key), ("tls_server_name", args.node_tls_server_name),
        )  # fmt: skip
        node_client = {k: v for k, v in node_flags if v}
        if node_client:
            settings.node_client = {**settings.node_client, **node_client}
        if args.worker_environments:
            from dl_inference.config import parse_worker_environment

            environments = dict(settings.worker_environments)
            environments.update(parse_worker_environment(text) for text in args.worker_environments)
            settings.worker_environments = environments
        settings.validate()
    except ServerError as exc:
        print(f"dl-inference: {exc.message}", file=sys.stderr)
        return 2
    os.environ["DL_INFERENCE_LOG_FORMAT"] = settings.log_format  # the workers and frontends log alike
    _setup_logging(settings.log_level, settings.log_format)
    from dl_inference.eventloop import run
    from dl_inference.gateway.server import serve

    return run(serve(settings))
