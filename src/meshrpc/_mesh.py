"""Where the app runs: Istio sidecar, ambient, or no mesh; and the sidecar's readiness.

The sidecar is asked over plain HTTP on 127.0.0.1 with a tiny client on asyncio
streams: two requests at startup do not justify an HTTP library dependency.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

from ._config import Config
from ._errors import MeshrpcError

logger = logging.getLogger("meshrpc.mesh")

SIDECAR = "istio-sidecar"
AMBIENT = "ambient"
NONE = "none"
PROBE_TIMEOUT = 0.5
STATUS_LINE_LIMIT = 1024  # bytes read of an HTTP answer: its status line
DEFAULT_CONNECTION_AGE = 300.0


# The mesh of the server whose code is running: set in the server's task before it
# starts serving, so its RPCs' tasks, its lifespan and its checks inherit it, and two apps
# served in one process (tests) each see their own.
_current: contextvars.ContextVar[MeshInfo | None] = contextvars.ContextVar("meshrpc_mesh", default=None)


def current_mode() -> str | None:
    """The mesh mode of the meshrpc server this code runs under, if one has started."""
    info = _current.get()
    return info.mode if info is not None else None


def current() -> MeshInfo | None:
    """The mesh of the meshrpc server this code runs under, if one has started."""
    return _current.get()


def set_current(info: MeshInfo) -> contextvars.Token[MeshInfo | None]:
    return _current.set(info)


def reset_current(token: contextvars.Token[MeshInfo | None] | None) -> None:
    if token is not None:
        _current.reset(token)


class SidecarNotReady(MeshrpcError):
    """The Istio sidecar did not report ready within the configured time."""


@dataclasses.dataclass(frozen=True)
class MeshInfo:
    """The mesh mode in force, why it was chosen, and where its sidecar answers."""

    mode: str
    reason: str
    sidecar_ready_url: str = "http://127.0.0.1:15021/healthz/ready"
    sidecar_ready_timeout: float = 120.0


async def http_status(url: str, method: str = "GET", timeout: float = 2.0) -> int:
    """The HTTP status ``url`` answers with; OSError/TimeoutError when it cannot be reached."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path or "/"

    async def ask() -> int:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(
                f"{method} {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            await writer.drain()
            # Only the status line matters: read at most STATUS_LINE_LIMIT bytes of it,
            # whatever (and however much) the other side sends.
            head = b""
            while b"\n" not in head and len(head) < STATUS_LINE_LIMIT:
                chunk = await reader.read(STATUS_LINE_LIMIT - len(head))
                if not chunk:
                    break
                head += chunk
        finally:
            writer.close()
        line = head.split(b"\n", 1)[0]
        match = re.match(rb"HTTP/\d(?:\.\d)? (\d{3})[ \r]", line + b"\r")
        if not match:
            raise OSError(f"not an HTTP answer from {url}: {line[:60]!r}")
        return int(match.group(1))

    return await asyncio.wait_for(ask(), timeout)


def parse_annotations(text: str) -> tuple[dict[str, str], list[str]]:
    """Parse the downward API's ``key="value"`` lines: the valid ones, and a problem per other line.

    One broken line must not hide the rest: a valid ``sidecar.istio.io/status`` beside
    it still means a sidecar.
    """
    annotations, problems = {}, []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip() or not (len(value) >= 2 and value[0] == value[-1] == '"'):
            problems.append(f'line {number} is not key="value": {line[:80]!r}')
            continue
        try:
            annotations[key.strip()] = value[1:-1].encode().decode("unicode_escape")
        except UnicodeDecodeError as exc:
            problems.append(f"line {number} has a bad escape: {exc.reason}")
    return annotations, problems


async def detect(config: Config) -> MeshInfo:
    """Decide the mesh mode: as configured, or (auto) from the pod's annotations or a probe."""
    found = await _detect_mode(config)
    return dataclasses.replace(
        found, sidecar_ready_url=config.sidecar_ready_url, sidecar_ready_timeout=config.sidecar_ready_timeout
    )


async def _detect_mode(config: Config) -> MeshInfo:
    if config.mesh != "auto":
        return MeshInfo(config.mesh, f"set by configuration (mesh={config.mesh})")
    path = Path(config.pod_annotations_path)
    try:
        text = path.read_text(errors="replace")  # noqa: ASYNC240 - a small local file, once
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("cannot read the pod annotations file %s: %s", path, exc)
    else:
        annotations, problems = parse_annotations(text)
        for problem in problems:
            logger.warning("pod annotations file %s: skipping %s", path, problem)
        if "sidecar.istio.io/status" in annotations:
            return MeshInfo(SIDECAR, f"annotation sidecar.istio.io/status in {path}")
        if annotations.get("ambient.istio.io/redirection") == "enabled":
            return MeshInfo(AMBIENT, f"annotation ambient.istio.io/redirection=enabled in {path}")
        return MeshInfo(NONE, f"no Istio annotation in {path}")
    try:
        status = await http_status(config.sidecar_ready_url, timeout=PROBE_TIMEOUT)
    except (TimeoutError, OSError) as exc:
        answer = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return MeshInfo(NONE, f"no annotations file at {path} and no sidecar at {config.sidecar_ready_url} ({answer})")
    # 503 is what Istio's pilot-agent answers there until its Envoy is ready: a sidecar
    # that is starting, the very case readiness must wait for.  Any other answer is
    # something else on that port.
    if status not in (200, 503):
        logger.warning("%s answers HTTP %d, not as a sidecar does: no sidecar", config.sidecar_ready_url, status)
        return MeshInfo(NONE, f"no annotations file at {path} and {config.sidecar_ready_url} answers HTTP {status}")
    return MeshInfo(SIDECAR, f"no annotations file at {path}, but {config.sidecar_ready_url} answers HTTP {status}")


async def wait_for_sidecar(
    url: str = "http://127.0.0.1:15021/healthz/ready",
    timeout: float = 120.0,
    *,
    log_every: float = 5.0,
) -> None:
    """Wait until the Istio sidecar's readiness endpoint answers 200.

    Polls with backoff (50 ms doubling to 1 s) and logs progress every
    ``log_every`` seconds; raises [`SidecarNotReady`][meshrpc.SidecarNotReady] after ``timeout``.
    Call it from a lifespan before making outbound calls through the mesh.
    """
    started = time.monotonic()
    deadline = started + timeout
    delay, next_log, attempts = 0.05, started + log_every, 0
    last = "no answer yet"
    while True:
        attempts += 1
        try:
            status = await http_status(url, timeout=min(2.0, max(0.05, deadline - time.monotonic())))
        except (TimeoutError, OSError) as exc:
            last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        else:
            if status == 200:
                logger.info("sidecar ready after %.1fs (%s)", time.monotonic() - started, url)
                return
            last = f"HTTP {status}"
        now = time.monotonic()
        if now >= deadline:
            raise SidecarNotReady(
                f"the Istio sidecar was not ready after {timeout:g}s: GET {url} "
                f"was tried {attempts} times, last answer: {last}"
            )
        if now >= next_log:
            logger.info(
                "waiting for the sidecar: GET %s -> %s (%.0fs of %.0fs)",
                url,
                last,
                now - started,
                timeout,
            )
            next_log = now + log_every
        await asyncio.sleep(min(delay, max(0.0, deadline - now)))
        delay = min(delay * 2, 1.0)


async def quit_sidecar(url: str | None = None, timeout: float = 5.0) -> bool:
    """Ask the Istio sidecar to exit, for a batch app that has finished its work.

    ``url`` defaults to the ``sidecar_quit_url`` setting (``MESHRPC_SIDECAR_QUIT_URL``,
    else ``http://127.0.0.1:15020/quitquitquit``).  Returns True when the sidecar
    accepted, False when none answered (no mesh).  Never call it from a server: the
    sidecar must outlive the drain.
    """
    if url is None:
        import os

        from ._config import from_env

        # A batch job calls this from its own main: this call is the edge where the setting is read.
        url = Config(**from_env(os.environ)).sidecar_quit_url
    try:
        status = await http_status(url, method="POST", timeout=timeout)
    except (TimeoutError, OSError):
        logger.info("no sidecar answered %s; nothing to stop", url)
        return False
    logger.info("asked the sidecar to exit: POST %s -> HTTP %d", url, status)
    return 200 <= status < 300


def connection_age(config: Config, mode: str) -> float | None:
    """Seconds before a client connection is asked to reconnect, or None for no limit.

    Without a mesh, an L4 Service pins each long-lived HTTP/2 connection to one
    pod (ambient's ztunnel balances per connection too); ageing connections makes
    clients reconnect and spread.  With a sidecar,
    Envoy balances per request, so it stays off unless set.
    """
    if config.max_connection_age is not None:
        return config.max_connection_age
    return None if mode == SIDECAR else DEFAULT_CONNECTION_AGE
