"""How it is scraped: the manifests' metrics port, and the live /metrics of `meshrpc serve`."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
import urllib.request

import grpc

from examples._generated.helloworld import helloworld_pb2, helloworld_pb2_grpc
from tests.helpers import ROOT, Served, free_port
from tests.manifests.helpers import container, generate

APP = "examples.multi.app:app"


def test_annotations_container_port_and_setting_agree() -> None:
    kinds = generate(APP, "--metrics-port", "9100")
    annotations = kinds["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    ports = {p["name"]: p["containerPort"] for p in container(kinds)["ports"]}
    env = {e["name"]: e["value"] for e in container(kinds)["env"]}
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == ports["http-metrics"] == int(env["MESHRPC_METRICS_PORT"]) == 9100
    # Never routed: not on the Service, not in any route.
    assert [p["port"] for p in kinds["Service"]["spec"]["ports"]] == [8888]
    assert "9100" not in str(kinds["VirtualService"]) and "9100" not in str(kinds["Gateway"])


def test_no_metrics() -> None:
    kinds = generate(APP, "--no-metrics")
    assert "prometheus.io/scrape" not in kinds["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert [p["name"] for p in container(kinds)["ports"]] == ["grpc"]
    assert "MESHRPC_METRICS_PORT" not in str(container(kinds)["env"])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        text: str = response.read().decode()
        return text


def test_serve_exposes_rpc_and_process_metrics_until_exit() -> None:
    metrics_port = free_port()
    env = {"MESHRPC_METRICS_PORT": str(metrics_port)}
    with Served("examples.greeter.app:app", "--drain-delay", "1", env=env) as served:
        served.wait_serving()
        with grpc.insecure_channel(served.target) as channel:
            stub = helloworld_pb2_grpc.GreeterStub(channel)
            for _ in range(3):
                stub.SayHello(helloworld_pb2.HelloRequest(name="m"))
            list(stub.SayHelloStream(helloworld_pb2.HelloRequest(name="m", count=2)))
            with contextlib.suppress(grpc.RpcError):  # an INVALID_ARGUMENT, counted by its code
                stub.SayHello(helloworld_pb2.HelloRequest(name=""))
        text = scrape(metrics_port)
        served.signal(signal.SIGTERM)
        time.sleep(0.5)
        during_drain = scrape(metrics_port)  # still served while draining
        assert served.wait() == 0
    ok = 'rpc_grpc_status_code="0",rpc_method="SayHello",rpc_service="helloworld.Greeter"'
    assert 'rpc_server_duration_milliseconds_count{otel_scope_name="meshrpc"' in text
    count = next(
        line for line in text.splitlines() if line.startswith("rpc_server_duration_milliseconds_count") and ok in line
    )
    assert count.endswith(" 3.0")
    assert 'rpc_grpc_status_code="3",rpc_method="SayHello"' in text  # the INVALID_ARGUMENT one
    assert 'rpc_method="SayHelloStream"' in text and "rpc_server_responses_per_rpc" in text
    assert "rpc_server_active_requests" in text
    assert "process_resident_memory_bytes" in text and "process_cpu_seconds_total" in text
    assert "rpc_server_duration_milliseconds_count" in during_drain
    assert f"metrics on http://127.0.0.1:{metrics_port}/metrics" in served.log


def test_a_missing_extra_is_said_clearly() -> None:
    code = (
        "import sys; sys.modules['opentelemetry.exporter.prometheus'] = None; sys.modules['prometheus_client'] = None\n"
        "from meshrpc._cli import main\n"
        f"sys.exit(main(['serve', 'examples.greeter.app:app', '--port', '{free_port()}', '--metrics-port', "
        f"'{free_port()}', '--mesh', 'none']))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert (
        "metrics_port needs opentelemetry-sdk, opentelemetry-exporter-prometheus and prometheus-client" in result.stderr
    )
    assert "pip install opentelemetry-sdk opentelemetry-exporter-prometheus prometheus-client" in result.stderr
    assert "Traceback" not in result.stderr
