"""The experiment of bench/bookd_direct.py (bookd publishing book events itself): the
load test's figures for it are only as good as what it publishes, so the envelopes must
be the bus's, seq must count per topic, and everything that is not a book must still
reach the bus."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import msgspec
import pytest

from ingest.messages import inner_messages, pack_event

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from bookd_direct import direct_out  # noqa: E402


class FakeBus:
    """bookd's PUSH to the bus."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, msg: bytes, flags: int = 0) -> None:
        self.sent.append(msg)


@pytest.fixture
def rig():
    made: list = []

    def make(**kw):
        bus = FakeBus()
        out = direct_out(f"inproc://direct-{uuid.uuid4().hex}", 1000, made)(bus, FakeBus(),
                                                                              **kw)
        published: list[bytes] = []
        out.send = lambda msg, flags=0: published.append(msg)  # what the PUB would carry
        return out, bus, published

    yield make
    for out in made:
        out.close()


def test_book_events_go_out_stamped_with_a_seq_per_topic(rig):
    out, bus, published = rig(batch=64, first=2)
    out.begin_pass()
    for k in range(3):
        out.event("book.BTC/USD", "MarketDataL2Event", b'{"k":%d}' % k)
        out.event("book.ETH/USD", "MarketDataL2Event", b'{"k":%d}' % k)
    out.flush()
    assert bus.sent == []
    envelopes = []
    for m in published:
        topic, _, body = m.partition(b" ")
        env = msgspec.json.decode(body)
        assert env["topic"] == topic.decode() and env["epoch"] == out.core.epoch
        assert env["type"] == "MarketDataL2Event" and env["v"] == 1
        envelopes.append((env["topic"], env["seq"], env["event"]["k"]))
    assert envelopes == [(f"book.{p}", k + 1, k) for k in range(3)
                         for p in ("BTC/USD", "ETH/USD")]


def test_batches_follow_bookds_flush_policy(rig):
    out, _, published = rig(batch=8, first=2)
    out.begin_pass()
    sizes = []
    for _ in range(20):
        before = len(published)
        out.event("book.X/Y", "MarketDataL2Event", b"{}")
        if len(published) > before:
            sizes.append(len(published) - before)
    assert sizes == [2, 4, 8]  # 14 sent within the pass, 6 wait for its end
    out.flush()
    assert len(published) == 20


def test_other_events_still_go_to_the_bus(rig):
    out, bus, published = rig(batch=8, first=2)
    out.event("system", "SystemStateEvent", b'{"s":1}')
    out.event("trigger", "PotentialHaltTriggerEvent", b'{"t":1}')
    out.flush()
    assert published == []
    assert [m for msg in bus.sent for m in inner_messages(msg)] == [
        pack_event("system", "SystemStateEvent", b'{"s":1}'),
        pack_event("trigger", "PotentialHaltTriggerEvent", b'{"t":1}')]
