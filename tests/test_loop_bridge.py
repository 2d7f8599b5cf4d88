"""The one bridge from the engine thread to asyncio (engine/stream.py's `LoopBridge`)."""

import asyncio
import threading

from loraplex.engine.request import TokenEvent
from loraplex.engine.stream import LoopBridge


def event(request_id: str, token: int) -> TokenEvent:
    return TokenEvent(request_id, token, f"t{token}")


def test_a_burst_of_events_wakes_the_loop_once_and_keeps_its_order():
    async def main():
        loop = asyncio.get_running_loop()
        bridge = LoopBridge(loop, on_lost=lambda request_id: None)
        received: dict[str, list[int]] = {"a": [], "b": []}
        sinks = {name: bridge.sink(lambda e, name=name: received[name].append(e.token_id)) for name in received}
        scheduled = []
        original = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args: scheduled.append(args) or original(*args)

        def engine_step():  # one step's tokens for two requests, from another thread
            for token in range(5):
                sinks["a"](event("a", token))
                sinks["b"](event("b", 10 + token))

        thread = threading.Thread(target=engine_step)
        thread.start()
        thread.join()
        await asyncio.sleep(0)
        loop.call_soon_threadsafe = original
        return received, len(scheduled)

    received, wake_ups = asyncio.run(main())
    assert received == {"a": [0, 1, 2, 3, 4], "b": [10, 11, 12, 13, 14]}
    assert wake_ups == 1


def test_events_after_a_drain_schedule_the_next_one():
    async def main():
        bridge = LoopBridge(asyncio.get_running_loop(), on_lost=lambda request_id: None)
        got = []
        sink = bridge.sink(lambda e: got.append(e.token_id))
        for token in range(3):
            await asyncio.to_thread(sink, event("a", token))
            await asyncio.sleep(0)
            assert got == list(range(token + 1))

    asyncio.run(main())


def test_events_for_a_closed_loop_cancel_their_requests():
    loop = asyncio.new_event_loop()
    lost = []
    bridge = LoopBridge(loop, on_lost=lost.append)
    sink = bridge.sink(lambda e: None)
    loop.close()
    sink(event("gone", 1))
    sink(event("gone-too", 2))
    assert lost == ["gone", "gone-too"]
