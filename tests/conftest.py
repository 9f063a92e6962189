from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from meshrpc import testing
from tests.apps.echo import Echo, app  # noqa: F401

from .helpers import ROOT  # noqa: F401


@pytest.fixture
async def echo_server() -> AsyncIterator[testing.TestServer]:
    async with testing.running(app) as server:
        yield server
