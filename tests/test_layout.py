"""The code's layers, as a reviewer reads them: each module writes only its own private state."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "meshrpc"


def _own_private_names(tree: ast.Module) -> set[str]:
    """Private attributes a module's own classes define: ``self._x = ...``, ``__slots__``, class-level ``_x``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                targets = (
                    item.targets
                    if isinstance(item, ast.Assign)
                    else [item.target]
                    if isinstance(item, ast.AnnAssign)
                    else []
                )
                for target in targets:
                    if isinstance(target, ast.Name) and target.id.startswith("_"):
                        names.add(target.id)
                    if (
                        isinstance(target, ast.Name)
                        and target.id == "__slots__"
                        and isinstance(item.value, (ast.Tuple, ast.List))
                    ):
                        names |= {
                            e.value for e in item.value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)
                        }
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if (
                    isinstance(target, ast.Attribute)
                    and isinstance(target.value, ast.Name)
                    and target.value.id == "self"
                ):
                    names.add(target.attr)
    return names


def _foreign_private_writes(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    own = _own_private_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                elements = target.elts if isinstance(target, ast.Tuple) else [target]
                for element in elements:
                    if not isinstance(element, ast.Attribute):
                        continue
                    name = element.attr
                    if not name.startswith("_") or name.startswith("__"):
                        continue
                    owner = element.value
                    if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                        continue
                    if name not in own:
                        found.append(f"{path.name}:{node.lineno} writes {ast.unparse(element)}")
    return found


def test_no_module_writes_another_modules_private_attributes() -> None:
    problems = [problem for path in sorted(SRC.rglob("*.py")) for problem in _foreign_private_writes(path)]
    assert problems == []


def test_the_layers_are_findable_by_file_name() -> None:
    for module in (
        "_app.py",
        "_config.py",
        "_assembly.py",
        "_server.py",
        "_handlers.py",
        "_middleware.py",
        "_telemetry.py",
    ):
        assert (SRC / module).is_file(), module
    assert (SRC / "_manifests").is_dir()
    server = (SRC / "_server.py").read_text()
    # The lifecycle module builds nothing itself: no grpc server, credentials or handler table.
    for wiring in ("grpc.aio.server(", "ssl_server_credentials", "MethodTable", "method_handler", "configure_sdk"):
        assert wiring not in server, wiring


def test_the_checker_sees_a_foreign_write(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f(app):\n    app._server = None\n")
    assert _foreign_private_writes(bad) == ["bad.py:2 writes app._server"]
