"""Logging set-up for the command line: one timestamped line per event."""

from __future__ import annotations

import logging
import sys

from ._telemetry import TraceContextFilter

FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s%(trace)s"


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%dT%H:%M:%S"))
    handler.addFilter(TraceContextFilter())  # log lines during an RPC carry its trace id
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
