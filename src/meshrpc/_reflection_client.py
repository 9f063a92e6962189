"""``meshrpc list|describe|call``: a gRPC client that learns the API from server reflection.

It works against any server with reflection (meshrpc serves it by default): the
descriptors come from the server through grpcio-reflection's descriptor database, the
messages are built with protobuf's message factory, and JSON is protobuf's own
``json_format``, so nothing about the API is typed by hand.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import grpc
from google.protobuf import descriptor, descriptor_pool, json_format, message_factory
from google.protobuf.message import Message
from google.rpc import error_details_pb2  # noqa: F401  (the standard detail types, for decoding)
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status

HIDDEN = ("grpc.reflection.",)  # reflection itself is not what users call


class ClientError(Exception):
    """A usage or connection problem, said in one line (exit status 2)."""


class Reflected:
    """A channel to ``target`` and the descriptors its reflection service gives."""

    def __init__(
        self,
        target: str,
        *,
        tls: bool = False,
        cacert: str | None = None,
        authority: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        options = [("grpc.default_authority", authority)] if authority else []
        if tls or cacert:
            root = None
            if cacert:
                try:
                    with open(cacert, "rb") as file:
                        root = file.read()
                except OSError as exc:
                    raise ClientError(f"cannot read --cacert {cacert}: {exc.strerror}") from None
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root), options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.target = target
        self.timeout = timeout
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            self.channel.close()
            raise ClientError(f"cannot connect to {target} within {timeout:g}s") from None
        self._database = ProtoReflectionDescriptorDatabase(self.channel)
        self.pool = descriptor_pool.DescriptorPool(self._database)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Reflected:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def services(self) -> list[str]:
        try:
            names = self._database.get_services()
        except grpc.RpcError as exc:
            raise ClientError(f"{self.target} does not answer server reflection: {_status_line(exc)}") from None
        return sorted(n for n in names if not n.startswith(HIDDEN))

    def service(self, name: str) -> descriptor.ServiceDescriptor:
        try:
            return self.pool.FindServiceByName(name)
        except grpc.RpcError as exc:
            raise ClientError(f"{self.target} does not answer server reflection: {_status_line(exc)}") from None
        except KeyError:
            raise ClientError(f"{self.target} has no service {name!r}; it has: {', '.join(self.services())}") from None

    def method(self, path: str) -> descriptor.MethodDescriptor:
        """``package.Service/Method``, ``package.Service.Method`` or ``/package.Service/Method``."""
        text = path.strip("/")
        service, sep, name = text.partition("/")
        if not sep:
            service, _, name = text.rpartition(".")
        if not service or not name:
            raise ClientError(f"{path!r} is not package.Service/Method")
        found = self.service(service).methods_by_name.get(name)
        if found is None:
            methods = ", ".join(m.name for m in self.service(service).methods)
            raise ClientError(f"service {service} has no method {name!r}; it has: {methods}")
        return found

    def symbol(self, name: str) -> descriptor.DescriptorBase:
        name = name.strip("/").replace("/", ".")
        for find in (self.pool.FindServiceByName, self.pool.FindMessageTypeByName, self.pool.FindEnumTypeByName):
            try:
                found: descriptor.DescriptorBase = find(name)
                return found
            except grpc.RpcError as exc:
                raise ClientError(f"{self.target} does not answer server reflection: {_status_line(exc)}") from None
            except KeyError:
                continue
        service, _, method = name.rpartition(".")
        if service:
            try:
                found_method: descriptor.DescriptorBase | None = self.pool.FindServiceByName(
                    service
                ).methods_by_name.get(method)
            except KeyError:
                found_method = None
            if found_method is not None:
                return found_method
        raise ClientError(f"{self.target} knows no service, method, message or enum {name!r}")


def message_class(message: descriptor.Descriptor) -> type[Message]:
    cls: type[Message] = message_factory.GetMessageClass(message)
    return cls


# -- describe ----------------------------------------------------------------------------

_TYPE_NAMES = {
    descriptor.FieldDescriptor.TYPE_DOUBLE: "double",
    descriptor.FieldDescriptor.TYPE_FLOAT: "float",
    descriptor.FieldDescriptor.TYPE_INT64: "int64",
    descriptor.FieldDescriptor.TYPE_UINT64: "uint64",
    descriptor.FieldDescriptor.TYPE_INT32: "int32",
    descriptor.FieldDescriptor.TYPE_FIXED64: "fixed64",
    descriptor.FieldDescriptor.TYPE_FIXED32: "fixed32",
    descriptor.FieldDescriptor.TYPE_BOOL: "bool",
    descriptor.FieldDescriptor.TYPE_STRING: "string",
    descriptor.FieldDescriptor.TYPE_BYTES: "bytes",
    descriptor.FieldDescriptor.TYPE_UINT32: "uint32",
    descriptor.FieldDescriptor.TYPE_SFIXED32: "sfixed32",
    descriptor.FieldDescriptor.TYPE_SFIXED64: "sfixed64",
    descriptor.FieldDescriptor.TYPE_SINT32: "sint32",
    descriptor.FieldDescriptor.TYPE_SINT64: "sint64",
}


def _field_type(field: descriptor.FieldDescriptor) -> str:
    if field.message_type is not None:
        if field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            return f"map<{_field_type(key)}, {_field_type(value)}>"
        return f".{field.message_type.full_name}"
    if field.enum_type is not None:
        return f".{field.enum_type.full_name}"
    return _TYPE_NAMES.get(field.type, "?")


def _repeated(field: descriptor.FieldDescriptor) -> bool:
    known = getattr(field, "is_repeated", None)  # protobuf 6+; ``label`` before it
    if isinstance(known, bool):
        return known
    return bool(getattr(field, "label", 0) == 3)  # LABEL_REPEATED


def _rpc_line(method: descriptor.MethodDescriptor) -> str:
    request = f"stream .{method.input_type.full_name}" if method.client_streaming else f".{method.input_type.full_name}"
    reply = f"stream .{method.output_type.full_name}" if method.server_streaming else f".{method.output_type.full_name}"
    return f"rpc {method.name} ( {request} ) returns ( {reply} );"


def _message_text(message: descriptor.Descriptor, indent: str = "") -> Iterator[str]:
    yield f"{indent}message {message.name} {{"
    for field in message.fields:
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        repeated = _repeated(field) and not is_map
        yield f"{indent}  {'repeated ' if repeated else ''}{_field_type(field)} {field.name} = {field.number};"
    yield f"{indent}}}"


def describe(found: descriptor.DescriptorBase) -> str:
    """``found`` as .proto-like text: what a caller needs to build a request."""
    if isinstance(found, descriptor.ServiceDescriptor):
        lines = [f"{found.full_name} is a service:", f"service {found.name} {{"]
        lines += [f"  {_rpc_line(m)}" for m in found.methods]
        lines.append("}")
        return "\n".join(lines)
    if isinstance(found, descriptor.MethodDescriptor):
        lines = [f"{found.full_name} is a method:", _rpc_line(found), ""]
        lines += [f"{found.input_type.full_name} (the request):", *_message_text(found.input_type), ""]
        lines += [f"{found.output_type.full_name} (the reply):", *_message_text(found.output_type)]
        return "\n".join(lines)
    if isinstance(found, descriptor.Descriptor):
        return "\n".join([f"{found.full_name} is a message:", *_message_text(found)])
    if isinstance(found, descriptor.EnumDescriptor):
        values = [f"  {v.name} = {v.number};" for v in found.values]
        return "\n".join([f"{found.full_name} is an enum:", f"enum {found.name} {{", *values, "}"])
    raise ClientError(f"cannot describe {found!r}")


# -- call -----------------------------------------------------------------------------


def _requests(method: descriptor.MethodDescriptor, data: str, pool: descriptor_pool.DescriptorPool) -> list[Message]:
    """The request message(s) from JSON: one object, or for a client stream an array of them."""
    cls = message_class(method.input_type)
    try:
        parsed = json.loads(data) if data.strip() else {}
    except json.JSONDecodeError as exc:
        raise ClientError(f"-d is not JSON: {exc}") from None
    items = parsed if method.client_streaming and isinstance(parsed, list) else [parsed]
    requests = []
    for item in items:
        try:
            requests.append(json_format.ParseDict(item, cls(), descriptor_pool=pool))
        except json_format.ParseError as exc:
            raise ClientError(f"-d is not a valid {method.input_type.full_name}: {exc}") from None
    if len(requests) != 1 and not method.client_streaming:
        raise ClientError(f"{method.full_name} takes one request message, not a list")
    return requests


def _to_json(message: Message, pool: descriptor_pool.DescriptorPool) -> str:
    return json_format.MessageToJson(message, indent=2, descriptor_pool=pool)


def call(
    reflected: Reflected,
    path: str,
    data: str,
    *,
    metadata: Sequence[tuple[str, str]] = (),
    timeout: float | None = None,
    out: TextIO = sys.stdout,
) -> None:
    """Call ``path`` with JSON ``data``; print each reply as JSON.  Raises grpc.RpcError on a failed call."""
    method = reflected.method(path)
    requests = _requests(method, data, reflected.pool)
    full = f"/{method.containing_service.full_name}/{method.name}"
    request_cls, reply_cls = message_class(method.input_type), message_class(method.output_type)
    serialize, deserialize = request_cls.SerializeToString, reply_cls.FromString
    channel = reflected.channel
    kwargs: dict[str, Any] = {"metadata": list(metadata) or None, "timeout": timeout}
    replies: Any
    if method.client_streaming and method.server_streaming:
        replies = channel.stream_stream(full, serialize, deserialize)(iter(requests), **kwargs)
    elif method.client_streaming:
        replies = [channel.stream_unary(full, serialize, deserialize)(iter(requests), **kwargs)]
    elif method.server_streaming:
        replies = channel.unary_stream(full, serialize, deserialize)(requests[0], **kwargs)
    else:
        replies = [channel.unary_unary(full, serialize, deserialize)(requests[0], **kwargs)]
    for reply in replies:
        print(_to_json(reply, reflected.pool), file=out, flush=True)


def _status_line(error: grpc.RpcError) -> str:
    found: Any = error
    code = found.code() if callable(getattr(found, "code", None)) else None
    details = found.details() if callable(getattr(found, "details", None)) else str(error)
    return f"{code.name if code else 'UNKNOWN'}: {details}"


def error_report(error: grpc.RpcError, pool: descriptor_pool.DescriptorPool) -> str:
    """A failed call as a person reads it: code, message, and each google.rpc.Status detail as JSON."""
    failed: Any = error
    lines = ["ERROR:", f"  Code: {failed.code().name}", f"  Message: {failed.details()}"]
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:
        status = None
    for packed in status.details if status is not None else ():
        name = packed.TypeName()
        detail: Message | None = None
        for candidate in (pool, descriptor_pool.Default()):
            try:
                found = candidate.FindMessageTypeByName(name)
            except KeyError:
                continue
            detail = message_class(found)()
            packed.Unpack(detail)
            break
        if detail is None:
            lines.append(f"  Details: {name} (unknown type, {len(packed.value)} bytes)")
            continue
        body = json_format.MessageToJson(detail, indent=2).replace("\n", "\n    ")
        lines.append(f"  Details: {name}\n    {body}")
    return "\n".join(lines)
