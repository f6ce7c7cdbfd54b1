"""bookd's event sink (`bookd.service._Out`): batching and the flush policy, on fakes."""

from __future__ import annotations

import zmq

from bookd.service import _Out
from ingest.messages import BATCH, inner_messages, pack_event


class FakeSocket:
    def __init__(self, full: bool = False) -> None:
        self.sent: list[bytes] = []
        self.full = full

    def send(self, msg: bytes, flags: int = 0) -> None:
        assert flags == zmq.NOBLOCK
        if self.full:
            raise zmq.Again()
        self.sent.append(msg)


def _rig(**kw) -> tuple[_Out, FakeSocket]:
    bus = FakeSocket()
    return _Out(bus, FakeSocket(), **kw), bus


def _sizes(sent: list[bytes]) -> list[int]:
    return [len(inner_messages(m)) for m in sent]


def test_outside_a_pass_events_wait_for_a_full_batch_or_the_flush():
    out, bus = _rig(batch=4)
    for k in range(6):
        out.event("book.X/Y", "MarketDataL2Event", b"%d" % k)
    assert len(bus.sent) == 1 and bus.sent[0][0] == BATCH
    out.flush()
    assert [m for msg in bus.sent for m in inner_messages(msg)] == [
        pack_event("book.X/Y", "MarketDataL2Event", b"%d" % k) for k in range(6)]
    out.flush()
    assert len(bus.sent) == 2  # nothing pending: nothing sent


def test_batches_double_within_a_pass_up_to_the_limit():
    out, bus = _rig(batch=64, first=2)
    out.begin_pass()
    for k in range(300):
        out.event("book.X/Y", "MarketDataL2Event", b"%d" % k)
    assert _sizes(bus.sent) == [2, 4, 8, 16, 32, 64, 64, 64]
    out.flush()  # the end of the pass
    assert _sizes(bus.sent)[-1] == 300 - 254
    out.begin_pass()  # a new burst: its first events go out early again
    for k in range(3):
        out.event("book.X/Y", "MarketDataL2Event", b"%d" % k)
    assert _sizes(bus.sent)[-1] == 2


def test_first_equal_to_the_batch_turns_the_policy_off():
    out, bus = _rig(batch=8, first=8)
    out.begin_pass()
    for _ in range(20):
        out.event("system", "SystemStateEvent", b"{}")
    assert _sizes(bus.sent) == [8, 8]


def test_drops_are_counted_per_event():
    out, bus = _rig(batch=64)
    bus.full = True
    for _ in range(5):
        out.event("system", "SystemStateEvent", b"{}")
    out.flush()
    assert out.drops_bus == 5 and out.batch.count == 0
