"""The committed generated code is what tools/genproto.py makes from proto/ today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "tools/genproto.py", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    committed = ROOT / "examples" / "_generated"
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    current = {
        p.relative_to(committed): p.read_bytes()
        for p in committed.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert sorted(fresh) == sorted(current), "files differ: run python tools/genproto.py"
    stale = [str(name) for name, data in fresh.items() if current[name] != data]
    assert not stale, f"stale generated code {stale}: run python tools/genproto.py"
