"""Find out whether the server's address can be bound, before grpc core tries.

grpc core reports a failed bind by printing its own error line to stderr and
raising a bare RuntimeError, with no word on why.  Binding a plain socket first,
with the options grpc uses, gives the reason (in use, not on this machine, not an
address) and keeps grpc's line off the terminal.  The socket is closed at once.
"""

from __future__ import annotations

import errno
import socket

from ._errors import BindError


def check_bindable(host: str, port: int, *, reuse_port: bool) -> None:
    """Raise [`BindError`][meshrpc.BindError] with the reason when ``host:port`` cannot be listened on."""
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    address = f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise BindError(
            f"cannot listen on {address}: {host!r} is not an address or host name of this machine ({exc})"
        ) from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port and hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                raise BindError(_reason(address, exc, reuse_port)) from None


def _reason(address: str, exc: OSError, reuse_port: bool) -> str:
    if exc.errno == errno.EADDRINUSE:
        hint = (
            "the other listener does not share it (SO_REUSEPORT)"
            if reuse_port
            else "another server listens there; pick another port, or set reuse_port to share it on purpose"
        )
        return f"cannot listen on {address}: the port is in use ({hint})"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {address}: the host is not an address of this machine"
    if exc.errno == errno.EACCES:
        return f"cannot listen on {address}: permission denied (ports below 1024 need privileges)"
    return f"cannot listen on {address}: {exc.strerror or exc}"
