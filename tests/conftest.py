"""Fixtures shared by tests/integration and tests/tools: the example repository and one running server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dl_inference.examples import make_example_repository
from tests.integration.server import RunningServer, run_server


@pytest.fixture(scope="session")
def example_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    make_example_repository(root)
    return root


@pytest.fixture(scope="session")
def server(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server for the read-mostly tests; tests that kill or reload things start their own."""
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with run_server(example_repo, log) as srv:
        yield srv
