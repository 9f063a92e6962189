"""The public surface: everything exported is listed, sorted, and nothing private leaks."""

from __future__ import annotations

import meshrpc
import meshrpc.testing


def test_all_is_sorted_and_complete() -> None:
    assert meshrpc.__all__ == sorted(meshrpc.__all__)
    public = {name for name in vars(meshrpc) if not name.startswith("_") or name == "__version__"}
    modules = {name for name in public if type(getattr(meshrpc, name)).__name__ == "module"}
    assert set(meshrpc.__all__) == public - modules


def test_exports_resolve_and_are_documented() -> None:
    for name in meshrpc.__all__:
        value = getattr(meshrpc, name)
        if callable(value) and name not in ("CallNext", "Lifespan"):  # type aliases
            assert value.__doc__, f"meshrpc.{name} has no docstring"


def test_testing_module_surface() -> None:
    assert meshrpc.testing.__all__ == sorted(meshrpc.testing.__all__)
    for name in meshrpc.testing.__all__:
        assert hasattr(meshrpc.testing, name)
