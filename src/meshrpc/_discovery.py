"""Find the user's App: ``MODULE:ATTR``, ``MESHRPC_APP`` or ``[tool.meshrpc] app``."""

from __future__ import annotations

import importlib
import sys
import traceback
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


def _import_chain(exc: BaseException) -> list[str]:
    """The project's source lines that led to ``exc``, outermost first (importlib's own left out)."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = Path(__file__).parent  # meshrpc's own frames are not the user's import chain
    return [
        f"{Path(f.filename).name}:{f.lineno}"
        for f in frames
        if "importlib" not in f.filename and Path(f.filename).parent != own
    ]


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
        missing = exc.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            raise AppError(f"cannot import module {module_name!r}: no module {missing!r} (from {cwd})") from None
        # The app's module exists, but something it imports does not: say what, and where.
        chain = " -> ".join(_import_chain(exc))
        hint = ""
        if missing.split(".")[-1].endswith(("_pb2", "_pb2_grpc")) or not missing.startswith(("google", "grpc")):
            hint = (
                f"; if {missing!r} is code generated from a .proto, generate it first: "
                "python -m grpc_tools.protoc -I PROTO_DIR --python_out=. --grpc_python_out=. PROTO_DIR/FILE.proto"
            )
        raise AppError(
            f"importing {module_name!r} failed: {exc}" + (f" (imported by {chain})" if chain else "") + hint
        ) from None
    except SyntaxError as exc:
        place = f"{exc.filename}:{exc.lineno}" if exc.filename else module_name
        raise AppError(f"cannot import {module_name!r}: {place}: SyntaxError: {exc.msg}") from None
    value: object = module
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            where = getattr(module, "__file__", None)  # another module of that name may shadow the app's
            raise AppError(
                f"module {module_name!r}{f' ({where})' if where else ''} has no attribute {attr!r}"
            ) from None
    if not isinstance(value, App):
        kind = type(value).__name__
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        raise AppError(f"{reference} is {article} {kind}, not a meshrpc.App")
    return value
