"""``meshrpc serve --reload``: a development supervisor that restarts the server on code changes.

The server runs in a child process (``python -m meshrpc serve ...`` with the same
arguments, no drain delay); watchfiles, the library uvicorn uses, watches the
project's ``.py`` files, and on a change the child is stopped with SIGINT (it
drains its in-flight RPCs) and started again on the same port.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from ._errors import AppError


def child_command(argv: Sequence[str]) -> list[str]:
    """The server's command line: the same arguments without --reload, and no drain delay."""
    args = [a for a in argv if a != "--reload"]
    return [sys.executable, "-m", "meshrpc", *args, "--drain-delay", "0"]


def serve_with_reload(argv: Sequence[str], directory: Path) -> int:
    try:
        import watchfiles
    except ImportError:
        raise AppError("--reload needs the watchfiles package: pip install watchfiles (the 'reload' extra)") from None

    def changed(changes: set[tuple[watchfiles.Change, str]]) -> None:
        names = sorted({Path(path).name for _, path in changes})
        print(f"meshrpc: {', '.join(names)} changed: restarting", file=sys.stderr, flush=True)

    print(f"meshrpc: watching .py files under {directory} (--reload)", file=sys.stderr, flush=True)
    watchfiles.run_process(
        directory,
        target=shlex.join(child_command(argv)),
        target_type="command",
        callback=changed,
        watch_filter=watchfiles.PythonFilter(),
        debounce=300,
        sigint_timeout=10,
    )
    return 0
