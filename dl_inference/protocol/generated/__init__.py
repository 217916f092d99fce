"""Python code generated from protos/*.proto by scripts/gen_protos.py.

Do not edit these files by hand: change the .proto sources and rerun
``python scripts/gen_protos.py`` (``--check`` verifies they are up to date).
"""
