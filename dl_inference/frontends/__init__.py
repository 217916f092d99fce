"""The protocol frontends: V2 gRPC (``grpc_server``), V2 HTTP (``http_server``), TF-Serving's gRPC and
REST APIs (``tfserving_grpc``, ``tfserving_http``) and the shared-memory HTTP routes, over any
:class:`~dl_inference.dataplane.DataPlane` (a gateway's, a frontend process's or a standalone worker's).
The processes that run them (``serve --frontends N``) are :mod:`dl_inference.gateway.frontend_processes`.

``grpc_calls`` is the one call guard of the gRPC services (request parsing, error codes, the rate
limit); ``aiohttp_patches`` holds the workarounds for aiohttp, installed explicitly by the HTTP frontend.
"""
