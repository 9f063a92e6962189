"""Find the user's App: ``MODULE:ATTR``, ``MESHRPC_APP`` or ``[tool.meshrpc] app``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from pathlib import Path

from ._app import App
from ._errors import AppError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

HOW_TO_SET = (
    "name the app as MODULE:ATTR (e.g. 'meshrpc serve app:app'), set MESHRPC_APP, "
    'or add [tool.meshrpc] app = "module:attr" to pyproject.toml'
)


def app_reference(given: str | None, environ: Mapping[str, str], cwd: Path) -> str:
    """The ``module:attr`` to load: the argument, then MESHRPC_APP, then pyproject.toml."""
    if given:
        return given
    if environ.get("MESHRPC_APP"):
        return environ["MESHRPC_APP"]
    pyproject = cwd / "pyproject.toml"
    if pyproject.is_file():
        try:
            data = tomllib.loads(pyproject.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise AppError(f"cannot read {pyproject}: {exc}") from None
        ref = data.get("tool", {}).get("meshrpc", {}).get("app")
        if isinstance(ref, str) and ref:
            return ref
    raise AppError(f"no app given: {HOW_TO_SET}")


def load_app(reference: str, cwd: Path) -> App:
    """Import ``module:attr`` with ``cwd`` importable (as uvicorn does) and return the App."""
    module_name, sep, attr = reference.partition(":")
    if not sep or not module_name or not attr:
        raise AppError(f"app reference {reference!r} is not MODULE:ATTR: {HOW_TO_SET}")
    if str(cwd) not in sys.path:
        sys.path.insert(0, str(cwd))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise AppError(f"cannot import module {module_name!r} (from {cwd})") from None
        raise
    value: object = module
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise AppError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(value, App):
        raise AppError(f"{reference} is a {type(value).__name__}, not a meshrpc.App")
    return value
