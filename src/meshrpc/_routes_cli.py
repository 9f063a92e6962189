"""The ``meshrpc routes`` command (its generator lives in _routes)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def add_routes_command(commands: Any) -> None:
    routes = commands.add_parser("routes", help="write Kubernetes and Istio manifests for an app")
    routes.add_argument("app", nargs="?", metavar="MODULE:ATTR")


def run_routes(ns: argparse.Namespace, load: Callable[[argparse.Namespace], Any]) -> int:
    raise NotImplementedError
