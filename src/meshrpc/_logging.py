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
import traceback
from pathlib import Path
from typing import Any

from ._errors import ConfigError
from ._telemetry import TraceContextFilter

FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s%(trace)s"
# grpc's asyncio layer logs every RPC at debug ("Loaded running loop"): noise, not news.
QUIET_LOGGERS = ("grpc._cython.cygrpc",)


# Every control character but tab, as a visible escape: what a client sent (a header, a
# request field in an exception's text) can then never start a log line of its own, nor
# colour or erase a terminal.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c != 0x09}
_CONTROLS.update({0x0A: "\\n", 0x0D: "\\r"})


def escape_controls(text: str) -> str:
    """``text`` with its control characters (newlines included) escaped."""
    return text if text.isprintable() else text.translate(_CONTROLS)


def exception_text(exc: BaseException) -> str:
    """A traceback as ``traceback`` prints it, but each exception's own text on one line,
    escaped: a newline in an exception's message cannot forge a log line."""
    lines: list[str] = []
    seen: set[int] = set()

    def add(error: BaseException) -> None:
        seen.add(id(error))
        cause, context = error.__cause__, error.__context__
        if cause is not None and id(cause) not in seen:
            add(cause)
            lines.append("\nThe above exception was the direct cause of the following exception:\n\n")
        elif context is not None and not error.__suppress_context__ and id(context) not in seen:
            add(context)
            lines.append("\nDuring handling of the above exception, another exception occurred:\n\n")
        if error.__traceback__ is not None:
            lines.append("Traceback (most recent call last):\n")
            lines.extend(traceback.format_tb(error.__traceback__))
        # One list item per line of its own (a SyntaxError's caret); newlines inside an item are the message's.
        lines.extend(escape_controls(line.rstrip("\n")) + "\n" for line in traceback.format_exception_only(error))

    add(exc)
    return "".join(lines).rstrip("\n")


class SafeFormatter(logging.Formatter):
    """A text formatter that escapes control characters in each message and exception text.

    One record is one line, plus its traceback's own lines; nothing a client or an
    exception's text holds can add a line that looks like a record.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802  (logging.Formatter's name)
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:  # noqa: N802
        exc = ei[1]
        return exception_text(exc) if isinstance(exc, BaseException) else super().formatException(ei)


class _OneLineDecodeErrors(logging.Filter):
    """grpc logs a header value that is not UTF-8 with a traceback, per read: one line is news enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.msg, str) and record.msg.startswith("Invalid encoding"):
            record.exc_info, record.exc_text = None, None
        return True


def configure(level: str) -> None:
    """Log to stderr at ``level``, unless the root logger has handlers already."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(SafeFormatter(FORMAT, datefmt="%Y-%m-%dT%H:%M:%S"))
        handler.addFilter(TraceContextFilter())  # log lines during an RPC carry its trace id
        root.addHandler(handler)
    root.setLevel(level.upper())
    for name in QUIET_LOGGERS:
        quiet = logging.getLogger(name)
        quiet.setLevel(max(logging.INFO, root.level))
        if not any(isinstance(f, _OneLineDecodeErrors) for f in quiet.filters):
            quiet.addFilter(_OneLineDecodeErrors())


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
