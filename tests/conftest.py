from __future__ import annotations

import signal
from collections.abc import AsyncIterator

import pytest

from meshrpc import testing
from tests.apps.echo import Echo, app  # noqa: F401

from . import helpers
from .helpers import ROOT  # noqa: F401

# Tests press Ctrl-C on the servers they start (SIGINT), as a user at a terminal does. A
# suite started in the background of a script (`cmd &` without job control) inherits SIGINT
# ignored, and so would every server it starts: Python keeps an ignored SIGINT ignored,
# and `meshrpc serve --reload` then never stops. Put back the default here, once.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def _subprocess_logs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Logs of the servers tests start stay under pytest's temporary directory."""
    helpers.LOG_DIR = tmp_path_factory.mktemp("server-logs")


@pytest.fixture
async def echo_server() -> AsyncIterator[testing.TestServer]:
    async with testing.running(app) as server:
        yield server
