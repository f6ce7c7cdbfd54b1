"""The load test's subscriber (bench/subscriber.py) without sockets: `Tally.drain` fed
with envelopes the bus core stamped, through a fake `recv`.

It is the measuring instrument, so what it counts must be right: every book event,
seq jumps per topic within an epoch (not across epochs), latency from `recv_ns`, and
the checksum of every N-th message and of every snapshot.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import msgspec
import zmq

from bus.schema import MarketDataL2Event, StatsEvent
from bus.service import BusCore

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from subscriber import Tally, kraken_crc  # noqa: E402

_enc = msgspec.json.Encoder()


def _crc(asks, bids) -> int:
    s = "".join(t.replace(".", "").lstrip("0") for lv in (*asks[:10], *bids[:10]) for t in lv)
    return zlib.crc32(s.encode())


def _l2(pair: str, i: int, *, snapshot: bool = False, conn_id: int = 1,
        bad_checksum: bool = False) -> MarketDataL2Event:
    bids = [(f"{60000 - k}.{i % 10}", f"0.{k + 1:08d}") for k in range(12)]
    asks = [(f"{60001 + k}.{i % 10}", f"{k + 1}.00500000") for k in range(12)]
    return MarketDataL2Event(
        pair=pair, timestamp=None, bids=bids, asks=asks,
        checksum=_crc(asks, bids) ^ (1 if bad_checksum else 0), conn_id=conn_id,
        exchange_ts_ns=None, recv_ns=1_000_000 + i, snapshot=snapshot, depth=25,
        price_precision=1, qty_precision=8)


def _stamp(core: BusCore, ev) -> bytes:
    topic = f"book.{ev.pair}" if isinstance(ev, MarketDataL2Event) else "stats"
    return core.stamp(topic.encode(), type(ev).__name__.encode(), _enc.encode(ev), 5)


def _feed(tally: Tally, msgs: list[bytes], now: int = 2_000_000) -> None:
    it = iter(msgs)

    def recv() -> bytes:
        for m in it:
            return m
        raise zmq.Again()

    tally.drain(recv, lambda: now, 10**12)


def test_counts_checks_and_latency():
    core = BusCore(epoch=111)
    tally = Tally(check_every=3)
    tally.control({"cmd": "window", "on": True}, 0)
    evs = [_l2("BTC/USD", 0, snapshot=True)] + [_l2("BTC/USD" if i % 2 else "ETH/USD", i)
                                                for i in range(1, 10)]
    stats = StatsEvent(timestamp="2026-08-16T23:37:10.000000000Z", process="bookd", pid=4,
                       counters={"mismatches": 0}, gauges={})
    _feed(tally, [_stamp(core, e) for e in evs[:5]] + [_stamp(core, stats)]
          + [_stamp(core, e) for e in evs[5:]])
    assert (tally.total, tally.snapshots, tally.mismatches, tally.bad) == (10, 1, 0, 0)
    assert tally.checked == 1 + 3  # the snapshot, then messages 3, 6 and 9
    assert (tally.seq_jumps, tally.seq_gaps) == (0, 0)
    assert tally.per_conn[1][0] == 10
    assert list(tally.lat) == [2_000_000 - (1_000_000 + i) for i in range(10)]
    assert tally.stats["bookd"]["counters"] == {"mismatches": 0}
    reply, running = tally.control({"cmd": "window", "on": False}, 0)
    assert running and reply["window"]["count"] == 10 and reply["total"] == 10


def test_buckets_count_per_100ms_across_drains():
    core = BusCore(epoch=111)
    tally = Tally(check_every=1000)
    evs = [_stamp(core, _l2("BTC/USD", i, snapshot=i == 0)) for i in range(7)]
    _feed(tally, evs[:3], now=5 * 10**8 + 1)       # bucket 5
    _feed(tally, evs[3:5], now=5 * 10**8 + 2)      # bucket 5 again: one row
    _feed(tally, evs[5:6], now=7 * 10**8)          # bucket 7
    _feed(tally, evs[6:], now=6 * 10**8)           # the clock stepped back: bucket 6
    reply, _ = tally.control({"cmd": "get", "buckets": True}, 0)
    assert reply["buckets"] == [(5, 5), (6, 1), (7, 1)]
    assert len(tally.buckets.keys) == 2  # the bucket being counted is not stored yet


def test_seq_jumps_within_an_epoch_are_loss_a_new_epoch_is_not():
    core = BusCore(epoch=111)
    msgs = [_stamp(core, _l2("BTC/USD", i)) for i in range(10)]
    tally = Tally(check_every=1000)
    _feed(tally, msgs[:3] + msgs[6:])  # seq 4, 5, 6 lost
    assert (tally.seq_jumps, tally.seq_gaps) == (1, 3)
    restarted = BusCore(epoch=222)  # seq starts again at 1: no jump
    _feed(tally, [_stamp(restarted, _l2("BTC/USD", i)) for i in range(3)])
    assert (tally.seq_jumps, tally.seq_gaps, tally.total) == (1, 3, 10)


def test_a_wrong_checksum_is_a_mismatch_and_garbage_is_bad():
    core = BusCore(epoch=111)
    tally = Tally(check_every=1)
    _feed(tally, [_stamp(core, _l2("BTC/USD", 1, bad_checksum=True)),
                  _stamp(core, _l2("BTC/USD", 2)), b"book.BTC/USD {not json",
                  b"stats {not json", b"stats {neither"])
    assert (tally.total, tally.checked, tally.mismatches, tally.bad) == (2, 2, 1, 3)


def test_kraken_crc_strips_the_dot_and_leading_zeros():
    asks = [("0.05005", "0.00500000")]
    bids = [("0.05000", "1.00000000")]
    assert kraken_crc(asks, bids) == zlib.crc32(b"5005500000" + b"5000100000000")
