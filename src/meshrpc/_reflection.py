"""Server reflection, v1alpha from grpcio-reflection and v1 beside it.

grpcio-reflection serves only ``grpc.reflection.v1alpha``; newer clients (grpcurl
1.9+, buf curl, Postman) ask for ``grpc.reflection.v1`` first.  The two protocols
have the same messages under another package name, so v1 is served by the same
servicer, and v1's descriptor is registered so that reflection can describe it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.reflection import aio as reflection_aio

from ._dispatch import MethodTable
from ._service import describe

V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
V1 = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _register_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return  # a newer grpcio-reflection (or the user) registered it already
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = _V1_FILE
    proto.package = "grpc.reflection.v1"
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(".grpc.reflection.v1alpha."):
                field.type_name = ".grpc.reflection.v1." + field.type_name.rsplit(".", 1)[1]
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(".v1alpha.", ".v1.")
        method.output_type = method.output_type.replace(".v1alpha.", ".v1.")
    pool.Add(proto)


def add_reflection(table: MethodTable, service_names: Iterable[str], *, intercepted: bool) -> tuple[str, ...]:
    """Serve reflection for ``service_names`` and both reflection services themselves
    (``intercepted``: the server has grpc.aio interceptors, see ``method_handler``)."""
    _register_v1_descriptor()
    from ._handlers import method_handler  # the same body and error mapping as the app's methods

    names = (*service_names, V1ALPHA, V1)
    servicer: Any = reflection_aio.ReflectionServicer(names)
    (service,) = describe(servicer)
    handlers = {m.name: method_handler(m, intercepted=intercepted) for m in service.methods}
    for name in (V1ALPHA, V1):
        table.add(name, handlers)
    return names
