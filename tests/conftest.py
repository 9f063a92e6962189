from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from meshrpc import testing
from tests.apps.echo import Echo, app  # noqa: F401

from . import helpers
from .helpers import ROOT  # noqa: F401


@pytest.fixture(scope="session", autouse=True)
def _subprocess_logs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Logs of the servers tests start stay under pytest's temporary directory."""
    helpers.LOG_DIR = tmp_path_factory.mktemp("server-logs")


@pytest.fixture
async def echo_server() -> AsyncIterator[testing.TestServer]:
    async with testing.running(app) as server:
        yield server
