"""Config: validation naming the setting, environment parsing, precedence."""

from __future__ import annotations

import dataclasses

import pytest

import meshrpc
from meshrpc._config import from_env


def test_defaults_fit_kubernetes() -> None:
    config = meshrpc.Config()
    assert config.port == 50051 and config.reflection is True
    assert config.drain_delay + config.grace < 30  # Kubernetes' default terminationGracePeriodSeconds
    assert config.reuse_port is False


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"port": 70000}, r"invalid setting port \(MESHRPC_PORT / --port\): must be 0..65535"),
        ({"grace": -1.0}, r"invalid setting grace \(MESHRPC_GRACE / --grace\)"),
        ({"drain_delay": float("nan")}, r"invalid setting drain_delay"),
        ({"max_concurrent_rpcs": 0}, r"invalid setting max_concurrent_rpcs"),
        ({"mesh": "linkerd"}, r"invalid setting mesh \(MESHRPC_MESH / --mesh\): must be one of auto, istio-sidecar"),
        ({"liveness_service": ""}, r"invalid setting liveness_service"),
        ({"max_receive_message_size": 0}, r"invalid setting max_receive_message_size"),
        ({"sidecar_ready_url": "ftp://x"}, r"invalid setting sidecar_ready_url"),
    ],
)
def test_invalid_settings_name_the_setting(changes: dict[str, object], message: str) -> None:
    with pytest.raises(meshrpc.ConfigError, match=message):
        meshrpc.Config(**changes)  # type: ignore[arg-type]


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        meshrpc.Config().port = 1  # type: ignore[misc]


def test_environment_parsing() -> None:
    env = {
        "MESHRPC_PORT": "8888",
        "MESHRPC_REFLECTION": "false",
        "MESHRPC_GRACE": "7.5",
        "MESHRPC_MAX_CONCURRENT_RPCS": "none",
        "MESHRPC_MESH": "ambient",
        "UNRELATED": "x",
    }
    changes = from_env(env)
    assert changes == {
        "port": 8888,
        "reflection": False,
        "grace": 7.5,
        "max_concurrent_rpcs": None,
        "mesh": "ambient",
    }
    assert meshrpc.Config(port=1).replace(**changes).port == 8888


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"MESHRPC_PORT": "eighty"},
            r"invalid setting port \(MESHRPC_PORT / --port\): wants a whole number, got 'eighty'",
        ),
        ({"MESHRPC_REFLECTION": "maybe"}, r"invalid setting reflection \(MESHRPC_REFLECTION / --reflection\)"),
    ],
)
def test_bad_environment_values(env: dict[str, str], message: str) -> None:
    with pytest.raises(meshrpc.ConfigError, match=message):
        from_env(env)


def test_replace_rejects_unknown_settings() -> None:
    with pytest.raises(meshrpc.ConfigError, match="unknown setting"):
        meshrpc.Config().replace(prot=1)


def test_configuration_reference_lists_every_setting() -> None:
    import subprocess
    import sys

    from tests.helpers import ROOT

    result = subprocess.run([sys.executable, "tools/gendocs.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "docs" / "configuration.md").read_text()
    for field in dataclasses.fields(meshrpc.Config):
        assert f"`MESHRPC_{field.name.upper()}`" in text


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"port": "8080"}, "invalid setting port (MESHRPC_PORT / --port): must be an integer, got str '8080'"),
        ({"drain_delay": "5"}, "invalid setting drain_delay (MESHRPC_DRAIN_DELAY / --drain-delay): must be a number"),
        ({"reflection": 1}, "invalid setting reflection (MESHRPC_REFLECTION / --reflection): must be true or false"),
        ({"port": True}, "must be an integer, got bool True"),
        ({"max_concurrent_rpcs": "3"}, "must be an integer or None, got str '3'"),
    ],
)
def test_wrong_types_in_code_are_config_errors(changes: dict[str, object], message: str) -> None:
    with pytest.raises(meshrpc.ConfigError) as info:
        meshrpc.Config(**changes)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_ints_are_accepted_as_seconds_and_levels_in_any_case() -> None:
    config = meshrpc.Config(drain_delay=5, log_level="DEBUG")
    assert config.drain_delay == 5.0 and isinstance(config.drain_delay, float)
    assert config.log_level == "debug"
