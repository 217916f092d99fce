"""Load generator, reference server and benchmarks for dl_inference.

Run the scripts from the repository root as modules, e.g. ``python -m load_tests.loadgen --help``.
See ``load_tests/README.md``.
"""
