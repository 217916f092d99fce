"""Balancing across endpoints: local worker instances and remote V2 nodes.

``settings`` (what an operator configures), ``endpoint`` (one place a request can go, with its
health and load), ``policies`` (least_request, weighted_round_robin), ``outlier`` (passive ejection,
panic mode), ``retry`` (retry budget), ``remote`` (a remote V2 gRPC node and its health checks),
``discovery`` (static list, node file, DNS), ``balancer`` (the endpoint sets and the retrying call).
"""
