"""Logging set-up for ``meshrpc serve`` and ``App.run()``: one timestamped line per event.

A logging configuration the user's code installed (a JSON formatter on the root
logger, say) is kept: meshrpc adds its handler only where the root has none.
``--log-config FILE`` applies a file instead, and ``--no-log-config`` leaves
logging entirely to the app.
"""

from __future__ import annotations

import logging
import logging.config
import sys
from pathlib import Path

from ._errors import ConfigError
from ._telemetry import TraceContextFilter

FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s%(trace)s"
# grpc's asyncio layer logs every RPC at debug ("Loaded running loop"): noise, not news.
QUIET_LOGGERS = ("grpc._cython.cygrpc",)


def configure(level: str) -> None:
    """Log to stderr at ``level``, unless the root logger has handlers already."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%dT%H:%M:%S"))
        handler.addFilter(TraceContextFilter())  # log lines during an RPC carry its trace id
        root.addHandler(handler)
    root.setLevel(level.upper())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))


def configure_from_file(path: str) -> None:
    """Apply a logging configuration file: ``.json`` or ``.yaml`` dictConfig, else fileConfig (ini)."""
    file = Path(path)
    try:
        text = file.read_text()
        if file.suffix in (".json", ".yaml", ".yml"):
            import yaml  # JSON is YAML too

            config = yaml.safe_load(text)
            # meshrpc's loggers exist before the file is applied: keep them unless it says otherwise.
            config.setdefault("disable_existing_loggers", False)
            logging.config.dictConfig(config)
        else:
            logging.config.fileConfig(file, disable_existing_loggers=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
        raise ConfigError(f"cannot apply --log-config {path}: {exc}") from None
