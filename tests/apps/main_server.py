"""The seed's main-server: main.MainService alone, on port 8888."""

from __future__ import annotations

import meshrpc
from examples.multi.app import MainService

app = meshrpc.App("main-server", services=[MainService()], config=meshrpc.Config(port=8888))
