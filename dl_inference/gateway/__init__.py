"""The gateway: frontends, routing to workers and nodes, and worker supervision."""
