"""RpcSession's deadlines: one timer per session serves every call in flight, whatever their timeouts."""

from __future__ import annotations

import asyncio
from typing import Any

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from lmgw.codes import RpcCode
from lmgw.jsonrpc import RpcError
from lmgw.methods import MethodTable, Param
from lmgw.session import RpcSession


def test_calls_expire_each_at_its_own_deadline_and_answered_calls_are_untouched() -> None:
    async def scenario() -> None:
        never = asyncio.Event()

        async def hang() -> None:
            await never.wait()

        async def ping() -> str:
            return "pong"

        async def handler(connection: Any) -> None:
            table = MethodTable()
            table.add("hang", hang)
            table.add("ping", ping)
            await RpcSession(connection, table, name="gateway").run()

        async with serve(handler, "127.0.0.1", 0) as server:
            port = list(server.sockets)[0].getsockname()[1]
            async with connect(f"ws://127.0.0.1:{port}/", proxy=None) as connection:
                caller = RpcSession(connection, MethodTable(), name="gateway")
                reader = asyncio.create_task(caller.run())
                ended: list[str] = []

                def call(name: str, method: str, timeout: float) -> asyncio.Task[Any]:
                    task = asyncio.create_task(caller.call(method, timeout=timeout))
                    task.add_done_callback(lambda _: ended.append(name))
                    return task

                late = call("late", "hang", 2.0)
                await asyncio.sleep(0)  # sent first: the earlier deadline comes second
                early = call("early", "hang", 0.2)
                assert await call("answered", "ping", 30) == "pong"
                for task, seconds in ((early, 0.2), (late, 2.0)):
                    error = await asyncio.gather(task, return_exceptions=True)
                    assert isinstance(error[0], RpcError) and error[0].code == RpcCode.CALL_TIMEOUT, error
                    assert f"did not answer hang within {seconds:g} s" in error[0].message
                # the order of the two expiries, not the ping's round trip against 0.2 s (a loaded machine)
                assert "answered" in ended and [name for name in ended if name != "answered"] == ["early", "late"]
                # the timer is set again for a call made after the others expired
                again = await asyncio.gather(caller.call("hang", timeout=0.1), return_exceptions=True)
                assert isinstance(again[0], RpcError) and again[0].code == RpcCode.CALL_TIMEOUT
                assert await caller.call("ping", timeout=30) == "pong"
                reader.cancel()

    asyncio.run(scenario())


def test_plain_handlers_are_answered_by_the_reader_and_async_ones_by_a_task_each() -> None:
    """A plain handler (``gw.ping``) is answered without a task; an error in it, or a result that is not
    JSON, is still an answer."""
    async def scenario() -> None:
        tasks_seen: list[int] = []
        sessions: list[RpcSession] = []
        release, slow_started = asyncio.Event(), asyncio.Event()

        def ping(payload: Any = None) -> dict[str, Any]:
            tasks_seen.append(len(sessions[0]._tasks))
            return {"payload": payload}

        def broken() -> None:
            raise KeyError("boom")

        def not_json() -> float:
            return float("nan")

        async def slow() -> str:
            tasks_seen.append(len(sessions[0]._tasks))
            slow_started.set()
            await release.wait()
            return "done"

        async def handler(connection: Any) -> None:
            table = MethodTable()
            table.add("ping", ping, [Param("payload", int, required=False)])
            table.add("broken", broken)
            table.add("not_json", not_json)
            table.add("slow", slow)
            assert table.immediate("ping") and table.immediate("unknown") and not table.immediate("slow")
            sessions.append(RpcSession(connection, table, name="gateway"))
            await sessions[0].run()

        async with serve(handler, "127.0.0.1", 0) as server:
            port = list(server.sockets)[0].getsockname()[1]
            async with connect(f"ws://127.0.0.1:{port}/", proxy=None) as connection:
                caller = RpcSession(connection, MethodTable(), name="dso")
                reader = asyncio.create_task(caller.run())
                assert await caller.call("ping", {"payload": 1}) == {"payload": 1}
                slow_call = asyncio.create_task(caller.call("slow"))
                await asyncio.wait_for(slow_started.wait(), 30)
                # served while the slow call waits in its task: the reader is not held up by it
                assert await caller.call("ping", {"payload": 2}) == {"payload": 2}
                error = (await asyncio.gather(caller.call("broken"), return_exceptions=True))[0]
                assert isinstance(error, RpcError) and error.code == RpcCode.INTERNAL_ERROR
                # a result json cannot encode is an answer too, and the reader reads on
                error = (await asyncio.gather(caller.call("not_json"), return_exceptions=True))[0]
                assert isinstance(error, RpcError) and error.code == RpcCode.INTERNAL_ERROR
                assert await caller.call("ping", {"payload": 3}) == {"payload": 3}
                release.set()
                assert await slow_call == "done"
                assert tasks_seen == [0, 1, 1, 1]  # the pings ran in no task of their own; the slow call in one
                assert sessions[0].serving == 0
                reader.cancel()

    asyncio.run(scenario())
