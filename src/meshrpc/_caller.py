"""Who is calling: the peer's identity as the mesh or TLS vouches for it.

Behind an Istio sidecar the caller's certificate ends at the sidecar, which
passes what it verified on in Envoy's ``x-forwarded-client-cert`` (XFCC) header.
Istio configures inbound sidecars with ``APPEND_FORWARD``: the sidecar appends
one element for the mTLS peer it verified, and removes the header on a
connection that is not mTLS.  So only the header's *last* element is the
sidecar's word; earlier ones are whatever upstream hops (or the caller) wrote.
Without a sidecar anyone can send the header, so it is ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import grpc

from . import _mesh
from ._rpc_context import current_rpc

XFCC = "x-forwarded-client-cert"
MAX_XFCC = 16 * 1024  # Envoy's element for one peer is far below this; more is not a sidecar's


@dataclasses.dataclass(frozen=True)
class Caller:
    """The identity of the peer that made the current RPC.

    ``spiffe_id`` is ``spiffe://<trust domain>/ns/<namespace>/sa/<service account>`` for
    a Kubernetes workload in an Istio mesh.  ``source`` says who vouched for it:
    ``"mesh"`` (the sidecar's XFCC header) or ``"tls"`` (this server's own TLS).
    """

    spiffe_id: str | None
    source: Literal["mesh", "tls"]
    # Every identity the peer's certificate carries (SAN URIs and DNS names, or its CN).
    identities: tuple[str, ...] = ()

    @property
    def principal(self) -> str | None:
        """The SPIFFE id without ``spiffe://``, as Istio's AuthorizationPolicy writes principals."""
        return self.spiffe_id.removeprefix("spiffe://") if self.spiffe_id else None

    @property
    def trust_domain(self) -> str | None:
        return self._parts()[0]

    @property
    def namespace(self) -> str | None:
        return self._parts()[1]

    @property
    def service_account(self) -> str | None:
        return self._parts()[2]

    def _parts(self) -> tuple[str | None, str | None, str | None]:
        principal = self.principal
        if principal is None:
            return None, None, None
        parts = principal.split("/")
        if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
            return parts[0], parts[2], parts[4]
        return parts[0], None, None


def caller() -> Caller | None:
    """The identity of the current RPC's caller, or None when nobody vouches for one.

    In sidecar mode: the SPIFFE id the Istio sidecar verified (from XFCC).  When the
    server itself serves TLS with client certificates: the certificate's identity.
    Otherwise, and outside a handler: None.
    """
    context = current_rpc.get(None)
    return caller_of(context, _mesh.current_mode()) if context is not None else None


def caller_of(context: grpc.aio.ServicerContext[Any, Any], mesh_mode: str | None) -> Caller | None:
    """The caller of the RPC behind ``context`` on a server in ``mesh_mode``."""
    if mesh_mode == _mesh.SIDECAR:
        header = None
        for key, value in context.invocation_metadata() or ():
            if key == XFCC and isinstance(value, str):
                header = value  # a repeated header: the last one is the sidecar's
        if header is not None and len(header) <= MAX_XFCC:
            elements = parse_xfcc(header)
            if elements:
                uris = tuple(value for key, value in elements[-1] if key == "uri")
                spiffe = next((uri for uri in uris if uri.startswith("spiffe://")), None)
                dns = tuple(value for key, value in elements[-1] if key == "dns")
                if spiffe is not None or uris or dns:
                    return Caller(spiffe_id=spiffe, source="mesh", identities=uris + dns)
    return _tls_caller(context)


def _tls_caller(context: grpc.aio.ServicerContext[Any, Any]) -> Caller | None:
    auth = context.auth_context() or {}
    if b"ssl" not in auth.get("transport_security_type", ()):
        return None
    identities = tuple(value.decode("utf-8", "replace") for value in context.peer_identities() or ())
    if not identities:
        return None  # TLS without a client certificate: nobody is vouched for
    spiffe_values = list(auth.get("peer_spiffe_id") or ()) or [
        v.encode() for v in identities if v.startswith("spiffe://")
    ]
    spiffe = spiffe_values[0].decode("utf-8", "replace") if spiffe_values else None
    return Caller(spiffe_id=spiffe, source="tls", identities=identities)


def parse_xfcc(header: str) -> list[list[tuple[str, str]]]:
    """Envoy's XFCC value as elements of (lowercased key, value) pairs.

    Elements are separated by ``,``, pairs by ``;``, a value may be double-quoted
    (then ``,``, ``;`` and ``=`` are literal and ``\\"`` is a quote).  A malformed
    header gives ``[]``: nothing half-parsed is trusted.
    """
    elements: list[list[tuple[str, str]]] = []
    pairs: list[tuple[str, str]] = []
    key: str | None = None
    token: list[str] = []
    quoted = False
    i, n = 0, len(header)
    while i < n:
        ch = header[i]
        if quoted:
            if ch == "\\" and i + 1 < n:
                token.append(header[i + 1])
                i += 2
                continue
            if ch == '"':
                quoted = False
            else:
                token.append(ch)
        elif ch == '"':
            if "".join(token).strip():
                return []  # a quote in the middle of a value
            token = []
            quoted = True
        elif ch == "=" and key is None:
            key = "".join(token).strip().lower()
            token = []
        elif ch in ";,":
            if key is None or not key:
                if "".join(token).strip():
                    return []  # a value without a key
            else:
                pairs.append((key, "".join(token).strip()))
            key, token = None, []
            if ch == ",":
                elements.append(pairs)
                pairs = []
        else:
            token.append(ch)
        i += 1
    if quoted:
        return []
    if key:
        pairs.append((key, "".join(token).strip()))
    elif "".join(token).strip():
        return []
    elements.append(pairs)
    return [element for element in elements if element]
