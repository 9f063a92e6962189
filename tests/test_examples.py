"""The examples work as their docstrings say: real processes, real calls."""

from __future__ import annotations

import grpc

from examples._generated.main import main_pb2, main_pb2_grpc
from tests.helpers import Served


def test_frontdoor_calls_the_greeter() -> None:
    with Served("examples.greeter.app:app") as greeter:
        greeter.wait_serving()
        with Served("examples.frontdoor.app:app", env={"GREETER_TARGET": f"dns:///{greeter.target}"}) as front:
            front.wait_serving()
            with grpc.insecure_channel(front.target) as channel:
                stub = main_pb2_grpc.MainServiceStub(channel)
                item = stub.GetItem(main_pb2.GetItemRequest(id="Ada"), timeout=5)
                assert (item.id, item.title) == ("Ada", "Hello, Ada!")
                try:
                    stub.GetItem(main_pb2.GetItemRequest(id=""), timeout=5)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
                else:
                    raise AssertionError("an empty id must be INVALID_ARGUMENT")
            greeter.close()  # the downstream goes away: the front door says UNAVAILABLE, not INTERNAL
            with grpc.insecure_channel(front.target) as channel:
                try:
                    main_pb2_grpc.MainServiceStub(channel).GetItem(main_pb2.GetItemRequest(id="Bob"), timeout=5)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
                    assert "greeter" in (exc.details() or "")  # type: ignore[attr-defined]
                else:
                    raise AssertionError("a missing downstream must be UNAVAILABLE")


def test_multi_example_serves_both_services() -> None:
    with Served("examples.multi.app:app") as served:
        served.wait_serving()
        with grpc.insecure_channel(served.target) as channel:
            stub = main_pb2_grpc.MainServiceStub(channel)
            assert stub.GetItem(main_pb2.GetItemRequest(id="1"), timeout=5).title == "item 1"
            assert [i.id for i in stub.ListItems(main_pb2.ListItemsRequest(limit=2), timeout=5)] == ["1", "2"]
