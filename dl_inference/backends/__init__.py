"""Backends: one per framework, each importing its framework lazily."""
