"""A rolling update through a real Envoy that health-checks two meshrpc replicas.

This is the proof of the drain: with a drain delay, replacing both replicas
while 8 callers hammer the proxy ends with zero errors; with no drain delay the
same rollout loses calls, so the test can fail.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rollout import rolling_update


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


async def test_rolling_update_through_envoy_loses_nothing(workdir: Path) -> None:
    rollout = await rolling_update(workdir, drain_delay=1.5)
    load, per_replica, exit_codes = rollout.load, rollout.per_replica, rollout.exit_codes
    print(f"rolling update with drain: statuses {dict(load.statuses)}, calls per replica {per_replica}")
    assert exit_codes == [0, 0]
    assert load.statuses["OK"] > 500
    assert set(load.statuses) == {"OK"}, f"errors during the rollout: {collections.Counter(load.errors)}"
    assert len(per_replica) == 4 and all(n > 0 for n in per_replica.values()), per_replica


async def test_rolling_update_without_drain_delay_loses_calls(workdir: Path) -> None:
    rollout = await rolling_update(workdir, drain_delay=0.0)
    load, per_replica = rollout.load, rollout.per_replica
    print(f"rolling update without drain delay: statuses {dict(load.statuses)}, calls per replica {per_replica}")
    failed = sum(n for status, n in load.statuses.items() if status != "OK")
    assert failed > 0, "stopping at once should have lost calls that Envoy still routed to the old replica"
    assert load.statuses["UNAVAILABLE"] > 0
