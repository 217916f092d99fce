"""Handlers of the example models; :mod:`dl_inference.examples` copies them into a repository."""
