"""dl_inference: a multi-backend inference server speaking KServe V2 over gRPC and HTTP."""

__version__ = "0.1.0"
