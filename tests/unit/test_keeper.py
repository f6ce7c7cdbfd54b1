"""bookd/keeper.py: BookKeeper's state machine, fed real Kraken frames, without sockets.

The keeper drives a recording writer (the pure `BookPublisher` over bytearrays, so range
checks and state words are the real ones) and a recording `out` (events, resync
requests). Frames are the vectors' bytes (python-kraken-sdk BTC/USD 1/8 depth 10,
DepthCharge MINA/GBP 4/8 depth 25), plus synthetic-market frames for a second pair and
frames rendered here from an independent reference `Book` (fresh snapshots).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bookd.book import Book
from bookd.checksum import checksum_levels
from bookd.keeper import BookKeeper, exchange_ts_ns, level_format
from bookd.layout import P_STATE, U32, BookState, pair_geometry
from bookd.seqlock import BookPublisher
from bus.schema import (
    MarketDataL2Event,
    PotentialHaltTriggerEvent,
    SchemaError,
    SystemStateEvent,
    decimal_to_ticks,
    rfc3339_to_ns,
    ticks_to_decimal,
)
from ingest.messages import ConnectionState, PairInfo, ResyncRequest, Stale
from ingest.wire import decode_book
from replay.synthetic import SyntheticMarket
from tests import vectors

pytestmark = pytest.mark.skipif(not vectors.available(),
                                reason=f"no vectors at {vectors.VECTORS_DIR}")

SDK = "python_kraken_sdk_orderbook_v2_btcusd.jsonl"
DEPTHCHARGE = "depthcharge_kraken_minagbp_d25_20260816.ndjson"
MS = 1_000_000
L2 = msgspec.json.Decoder(MarketDataL2Event)
SYSTEM = msgspec.json.Decoder(SystemStateEvent)
TRIGGER = msgspec.json.Decoder(PotentialHaltTriggerEvent)


def book_frames(name: str) -> list[bytes]:
    """The book frames of a vector file, verbatim bytes (sliced, never re-serialised)."""
    _, frames = vectors.read_file(vectors.VECTORS_DIR / name)
    return [f.frame for f in frames if f.frame.startswith(b'{"channel":"book"')]


def synthetic_frames(pair: str, depth: int, n: int, seed: int = 7) -> tuple[tuple[int, int],
                                                                           list[bytes]]:
    """(precisions, [snapshot, n updates]) of one pair of the synthetic market."""
    m = SyntheticMarket([pair], depth, seed)
    out = [m.snapshot_frame(pair)]
    while len(out) <= n:
        f = m.next_event()
        if f.channel == "book":
            out.append(f.frame)
    return m.precisions[pair], out


def corrupt(frame: bytes) -> bytes:
    """The same frame with a wrong checksum field (levels untouched)."""
    def bump(m: re.Match) -> bytes:
        return b'"checksum":%d' % ((int(m.group(1)) + 1) % 2**32)
    out, n = re.subn(rb'"checksum":(\d+)', bump, frame)
    assert n == 1
    return out


def render_snapshot(pair: str, book: Book, pp: int, qp: int,
                    ts: str = "2026-08-16T23:40:00.000001Z") -> bytes:
    """A Kraken snapshot frame of `book` (what a resubscribe would get)."""
    def side(levels):
        return ",".join(f'{{"price":{ticks_to_decimal(p, pp)},"qty":{ticks_to_decimal(q, qp)}}}'
                        for p, q in levels)
    return (f'{{"channel":"book","type":"snapshot","data":[{{"symbol":"{pair}",'
            f'"bids":[{side(book.bids())}],"asks":[{side(book.asks())}],'
            f'"checksum":{checksum_levels(book.asks(), book.bids())},'
            f'"timestamp":"{ts}"}}]}}').encode()


# --------------------------------------------------------------------------------------
# the fakes

class RecordingWriter(BookPublisher):
    """The real pure publisher over bytearrays, recording every call the keeper makes."""

    def __init__(self, pairs: list[str], depth: int) -> None:
        self.bufs = [bytearray(pair_geometry(depth).size) for _ in pairs]
        super().__init__(self.bufs, pairs, depth, generation=1)
        self.calls: list[tuple] = []

    def publish(self, i, bid_prices, bid_qtys, ask_prices, ask_qtys, *, checksum,
                exchange_ts_ns, recv_ns):
        self.calls.append(("publish", i, list(zip(bid_prices, bid_qtys, strict=True)),
                           list(zip(ask_prices, ask_qtys, strict=True)), checksum,
                           exchange_ts_ns, recv_ns))
        super().publish(i, bid_prices, bid_qtys, ask_prices, ask_qtys, checksum=checksum,
                        exchange_ts_ns=exchange_ts_ns, recv_ns=recv_ns)

    def publish_book(self, i, book, changed, checksum, exchange_ts_ns, recv_ns):
        self.calls.append(("publish", i, book.bids(), book.asks(), checksum, exchange_ts_ns,
                           recv_ns))
        super().publish_book(i, book, changed, checksum, exchange_ts_ns, recv_ns)
        # publish_book repacks only the `changed` sides: the segment must hold the whole
        # book all the same, after any sequence of mismatches, resyncs and halts
        assert self.segment(i) == (book.bids(), book.asks(), checksum, exchange_ts_ns,
                                   recv_ns)

    def segment(self, i: int) -> tuple:
        """(bids, asks, checksum, exchange_ts_ns, recv_ns) as pair i's segment holds them."""
        d = self.depth
        state, nb, na, crc, ts, recv, _, *v = pair_geometry(d).publish.unpack_from(
            self.bufs[i], P_STATE)
        assert state == BookState.VALID
        assert not any(v[nb:d] + v[d + nb:2 * d] + v[2 * d + na:3 * d] + v[3 * d + na:])
        bids = list(zip(v[:nb], v[d:d + nb], strict=True))
        asks = list(zip(v[2 * d:2 * d + na], v[3 * d:3 * d + na], strict=True))
        return bids, asks, crc, ts, recv

    def set_state(self, i, state):
        self.calls.append(("set_state", i, BookState(state)))
        super().set_state(i, state)

    def set_precision(self, i, price_precision, qty_precision):
        self.calls.append(("set_precision", i, price_precision, qty_precision))
        super().set_precision(i, price_precision, qty_precision)

    def count(self, i, mismatches=0, resyncs=0):
        self.calls.append(("count", i, mismatches, resyncs))
        super().count(i, mismatches, resyncs)

    def state(self, i: int) -> BookState:
        """The state word as it stands in pair i's segment bytes."""
        return BookState(U32.unpack_from(self.bufs[i], P_STATE)[0])

    def published(self, i: int) -> list[tuple]:
        return [c for c in self.calls if c[0] == "publish" and c[1] == i]


class RecordingOut:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, bytes]] = []
        self.resyncs: list[ResyncRequest] = []

    def event(self, topic: str, type_name: str, payload: bytes) -> None:
        self.events.append((topic, type_name, bytes(payload)))

    def resync(self, req: ResyncRequest) -> None:
        self.resyncs.append(req)


class Rig:
    """A keeper with its fakes, a fake clock and per-(conn, pair) sequence numbers."""

    def __init__(self, pairs: dict[str, tuple[int, int]], depth: int, **kw) -> None:
        self.pairs = list(pairs)
        self.prec = dict(pairs)
        self.depth = depth
        self.writer = RecordingWriter(self.pairs, depth)
        self.out = RecordingOut()
        self.now = 1_000 * MS
        self.keeper = BookKeeper(self.pairs, depth, self.writer, self.out,
                                 clock_ns=lambda: 1_767_225_600 * 10**9 + self.now, **kw)
        self.seq: dict[tuple[int, str], int] = {}
        self.conn = dict.fromkeys(self.pairs, 0)

    def info(self, pair: str, conn_id: int = 1) -> None:
        pp, qp = self.prec[pair]
        self.conn[pair] = conn_id
        self.keeper.on_control(PairInfo(conn_id, pair, self.pairs.index(pair), self.depth,
                                        pp, qp), self.now)

    def feed(self, pair: str, frame: bytes, *, skip: int = 0) -> None:
        """One frame of `pair` on its current connection; `skip` seq numbers lost first."""
        key = (self.conn[pair], pair)
        seq = self.seq[key] = self.seq.get(key, 0) + 1 + skip
        self.now += MS
        self.keeper.on_frame(self.pairs.index(pair), self.conn[pair], seq, self.now + 7,
                             frame, self.now)

    def mark(self) -> tuple[int, int, int]:
        return len(self.out.events), len(self.out.resyncs), len(self.writer.calls)

    def l2(self, pair: str | None = None, since: int = 0) -> list[MarketDataL2Event]:
        evs = [L2.decode(b) for t, n, b in self.out.events[since:] if n == "MarketDataL2Event"]
        return [e for e in evs if pair is None or e.pair == pair]

    def system(self, pair: str | None = None, since: int = 0) -> list[SystemStateEvent]:
        evs = [SYSTEM.decode(b) for t, n, b in self.out.events[since:]
               if n == "SystemStateEvent"]
        return [e for e in evs if pair is None or e.pair == pair]

    def codes(self, pair: str, since: int = 0) -> list[str]:
        return [e.status_code for e in self.system(pair, since)]

    def triggers(self) -> list[tuple[str, PotentialHaltTriggerEvent]]:
        return [(t, TRIGGER.decode(b)) for t, n, b in self.out.events
                if n == "PotentialHaltTriggerEvent"]


def expected_event(pair: str, book: Book, pp: int, qp: int, depth: int, frame: bytes,
                   conn_id: int, recv_ns: int) -> MarketDataL2Event:
    """The Struct a correct bookd publishes for `book` after `frame`."""
    (u,) = decode_book(frame, {pair: (pp, qp)})
    return MarketDataL2Event(
        pair=pair, timestamp=u.timestamp,
        bids=[(ticks_to_decimal(p, pp), ticks_to_decimal(q, qp)) for p, q in book.bids()],
        asks=[(ticks_to_decimal(p, pp), ticks_to_decimal(q, qp)) for p, q in book.asks()],
        checksum=u.checksum, conn_id=conn_id,
        exchange_ts_ns=rfc3339_to_ns(u.timestamp) if u.timestamp else None,
        recv_ns=recv_ns, snapshot=u.snapshot, depth=depth, price_precision=pp,
        qty_precision=qp)


# --------------------------------------------------------------------------------------
# every message publishes, and events are exactly the book

@pytest.mark.parametrize("name,pair,depth", [(SDK, "BTC/USD", 10), (DEPTHCHARGE, "MINA/GBP", 25)])
def test_every_message_publishes_the_exact_book(name, pair, depth):
    pp, qp = vectors.KNOWN_PRECISIONS[pair]
    frames = book_frames(name)
    assert frames[0].startswith(b'{"channel":"book","type":"snapshot"') and len(frames) > 20
    rig = Rig({pair: (pp, qp)}, depth)
    rig.info(pair)
    assert ("set_precision", 0, pp, qp) in rig.writer.calls
    ref = Book(pair, depth)
    for n, frame in enumerate(frames):
        before = len(rig.out.events)
        rig.feed(pair, frame)
        (u,) = decode_book(frame, {pair: (pp, qp)})
        assert ref.apply(u.snapshot, u.bids, u.asks) == u.checksum  # Kraken's own value
        pub = rig.writer.published(0)
        assert len(pub) == n + 1, f"message {n} was not published"
        _, _, bids, asks, crc, ts_ns, recv_ns = pub[-1]
        assert (bids, asks, crc) == (ref.bids(), ref.asks(), u.checksum)
        assert ts_ns == (rfc3339_to_ns(u.timestamp) if u.timestamp else 0)
        assert recv_ns == rig.now + 7
        (raw,) = [b for t, k, b in rig.out.events[before:] if k == "MarketDataL2Event"]
        assert rig.out.events[-1][0] == f"book.{pair}"
        got = L2.decode(raw)
        want = expected_event(pair, ref, pp, qp, depth, frame, 1, rig.now + 7)
        assert got == want
        # ... and what msgspec itself encodes for that Struct decodes to the same
        assert L2.decode(msgspec.json.encode(want)) == got
        assert msgspec.json.decode(raw) == msgspec.json.decode(msgspec.json.encode(want))
        for p, q in got.bids + got.asks:  # exact spelling at the precision
            assert len(p.partition(".")[2]) == pp and len(q.partition(".")[2]) == qp
        assert checksum_levels([(decimal_to_ticks(p, pp)[0], decimal_to_ticks(q, qp)[0])
                                for p, q in got.asks],
                               [(decimal_to_ticks(p, pp)[0], decimal_to_ticks(q, qp)[0])
                                for p, q in got.bids]) == got.checksum
    assert rig.writer.state(0) is BookState.VALID
    assert rig.codes(pair) == ["VALID"]  # once, after the first snapshot
    assert rig.out.resyncs == []
    c = rig.keeper.counters
    assert c["events"] == len(frames) and c["mismatches"] == c["resyncs"] == 0


class _RawLevel(msgspec.Struct):
    price: msgspec.Raw
    qty: msgspec.Raw


class _RawData(msgspec.Struct):
    bids: list[_RawLevel]
    asks: list[_RawLevel]


class _RawMsg(msgspec.Struct):
    data: list[_RawData]


def test_event_strings_are_the_wire_tokens_with_trailing_zeros():
    frames = book_frames(DEPTHCHARGE)
    rig = Rig({"MINA/GBP": (4, 8)}, 25)
    rig.info("MINA/GBP")
    rig.feed("MINA/GBP", frames[0])
    (ev,) = rig.l2("MINA/GBP")
    (d,) = msgspec.json.decode(frames[0], type=_RawMsg).data
    assert len(d.bids) == len(ev.bids) == 25
    assert ev.bids == [(bytes(lv.price).decode(), bytes(lv.qty).decode()) for lv in d.bids]
    assert ev.asks == [(bytes(lv.price).decode(), bytes(lv.qty).decode()) for lv in d.asks]
    assert ("0.0280", "12925.63811394") in ev.bids and ("0.0276", "4207.74770000") in ev.bids
    assert ev.snapshot and ev.exchange_ts_ns == rfc3339_to_ns(ev.timestamp)


def test_a_hostile_timestamp_cannot_break_or_forge_the_event():
    rig = Rig({"BTC/USD": (1, 8)}, 10)
    rig.info("BTC/USD")
    frames = book_frames(SDK)
    rig.feed("BTC/USD", frames[0])
    ts = b'"timestamp":"2023-07-30T15:29:58.343415Z"'
    assert ts in frames[1]
    hostile = 'x","checksum":1,"pair":"FORGED\\'
    rig.feed("BTC/USD", frames[1].replace(ts, b'"timestamp":' + msgspec.json.encode(hostile)))
    (ev,) = rig.l2(since=2)
    assert ev.pair == "BTC/USD" and ev.timestamp == hostile and ev.exchange_ts_ns is None
    assert ev.checksum == decode_book(frames[1], {"BTC/USD": (1, 8)})[0].checksum


# --------------------------------------------------------------------------------------
# resyncs

def two_pairs(**kw) -> tuple[Rig, list[bytes], list[bytes], Book, tuple[int, int]]:
    """BTC/USD from the SDK fixture and ETH/USD from the synthetic market, depth 10."""
    eth_prec, eth = synthetic_frames("ETH/USD", 10, 150)
    rig = Rig({"BTC/USD": (1, 8), "ETH/USD": eth_prec}, 10, **kw)
    rig.info("BTC/USD")
    rig.info("ETH/USD")
    return rig, book_frames(SDK), eth, Book("BTC/USD", 10), eth_prec


def apply_ref(ref: Book, frame: bytes, pp: int = 1, qp: int = 8) -> None:
    (u,) = decode_book(frame, {ref.symbol: (pp, qp)})
    ref.apply(u.snapshot, u.bids, u.asks)


def test_corrupted_checksum_resyncs_that_pair_only_and_withholds_until_a_snapshot():
    rig, btc, eth, ref, _ = two_pairs()
    for k in range(40):
        rig.feed("BTC/USD", btc[k])
        apply_ref(ref, btc[k])
        rig.feed("ETH/USD", eth[k])
    assert len(rig.l2("BTC/USD")) == 40 and len(rig.l2("ETH/USD")) == 40
    ev0, rs0, _ = rig.mark()
    rig.feed("BTC/USD", corrupt(btc[40]))
    apply_ref(ref, btc[40])
    rig.feed("ETH/USD", eth[40])
    assert rig.writer.state(0) is BookState.RESYNCING
    assert rig.writer.state(1) is BookState.VALID
    (req,) = rig.out.resyncs[rs0:]
    assert req.pairs == ("BTC/USD",) and req.conn_id == 1 and "checksum" in req.reason
    assert rig.codes("BTC/USD", ev0) == ["RESYNCING"]
    assert ("count", 0, 1, 0) in rig.writer.calls and ("count", 0, 0, 1) in rig.writer.calls
    # updates keep coming on the old subscription: withheld; ETH/USD flows on
    for k in range(41, 60):
        rig.feed("BTC/USD", btc[k])
        apply_ref(ref, btc[k])
        rig.feed("ETH/USD", eth[k])
    assert rig.l2("BTC/USD", ev0) == []
    assert len(rig.l2("ETH/USD", ev0)) == 20
    assert len(rig.writer.published(0)) == 40
    assert rig.writer.state(0) is BookState.RESYNCING
    assert len(rig.out.resyncs) == rs0 + 1  # ignored updates do not ask again (yet)
    # the fresh snapshot validates: VALID, events again, and the book is right
    mid = len(rig.out.events)
    rig.feed("BTC/USD", render_snapshot("BTC/USD", ref, 1, 8))
    assert rig.writer.state(0) is BookState.VALID
    assert rig.codes("BTC/USD", mid) == ["VALID"]
    (snap,) = rig.l2("BTC/USD", mid)
    assert snap.snapshot and rig.writer.published(0)[-1][2:4] == (ref.bids(), ref.asks())
    for k in range(60, 80):
        rig.feed("BTC/USD", btc[k])
        apply_ref(ref, btc[k])
    assert len(rig.l2("BTC/USD", mid)) == 21
    assert rig.writer.published(0)[-1][2:4] == (ref.bids(), ref.asks())
    assert rig.triggers() == []


def test_isolated_bad_checksum_field_is_tolerated_below_the_threshold():
    rig, btc, eth, ref, _ = two_pairs(max_mismatches=2)
    for k in range(30):
        rig.feed("BTC/USD", btc[k])
    ev0, rs0, _ = rig.mark()
    rig.feed("BTC/USD", corrupt(btc[30]))
    assert rig.writer.state(0) is BookState.RESYNCING
    assert rig.l2("BTC/USD", ev0) == [] and rig.codes("BTC/USD", ev0) == ["RESYNCING"]
    rig.feed("BTC/USD", btc[31])  # its checksum verifies: the book was right all along
    assert rig.writer.state(0) is BookState.VALID
    assert rig.codes("BTC/USD", ev0) == ["RESYNCING", "VALID"]
    (ev,) = rig.l2("BTC/USD", ev0)
    assert ev.checksum == decode_book(btc[31], {"BTC/USD": (1, 8)})[0].checksum
    assert len(rig.out.resyncs) == rs0  # no resync request
    # two in a row reach the threshold: resync
    rig.feed("BTC/USD", corrupt(btc[32]))
    rig.feed("BTC/USD", corrupt(btc[33]))
    (req,) = rig.out.resyncs[rs0:]
    assert req.pairs == ("BTC/USD",)
    assert rig.keeper.counters["mismatches"] == 3


def test_sequence_gap_resyncs():
    rig, btc, eth, ref, _ = two_pairs()
    for k in range(20):
        rig.feed("BTC/USD", btc[k])
        apply_ref(ref, btc[k])
    ev0, rs0, _ = rig.mark()
    rig.feed("BTC/USD", btc[21], skip=1)  # seq 22 after 20: one frame lost
    apply_ref(ref, btc[20])
    apply_ref(ref, btc[21])
    (req,) = rig.out.resyncs[rs0:]
    assert req.pairs == ("BTC/USD",) and "gap" in req.reason
    assert rig.writer.state(0) is BookState.RESYNCING and rig.l2(since=ev0) == []
    assert rig.keeper.counters["gaps"] == 1
    rig.feed("BTC/USD", btc[22])  # contiguous again, but no snapshot yet: withheld
    apply_ref(ref, btc[22])
    assert rig.l2(since=ev0) == []
    rig.feed("BTC/USD", render_snapshot("BTC/USD", ref, 1, 8))
    assert rig.writer.state(0) is BookState.VALID and len(rig.l2("BTC/USD", ev0)) == 1


def test_updates_before_a_snapshot_are_ignored():
    rig = Rig({"BTC/USD": (1, 8)}, 10)
    btc = book_frames(SDK)
    rig.info("BTC/USD")
    for k in range(1, 6):
        rig.feed("BTC/USD", btc[k])
    assert rig.writer.published(0) == [] and rig.out.events == [] and rig.out.resyncs == []
    assert rig.keeper.counters["ignored"] == 5
    assert rig.writer.state(0) is BookState.EMPTY
    # a frame before any PairInfo of its connection is dropped too
    rig.keeper.on_frame(0, 99, 1, 1, btc[0], rig.now)
    assert rig.writer.published(0) == []
    rig.feed("BTC/USD", btc[0])
    assert len(rig.writer.published(0)) == 1 and rig.writer.state(0) is BookState.VALID


def test_a_new_connection_awaits_its_snapshot():
    rig, btc, eth, ref, _ = two_pairs()
    for k in range(20):
        rig.feed("BTC/USD", btc[k])
        apply_ref(ref, btc[k])
    ev0, rs0, _ = rig.mark()
    rig.info("BTC/USD", conn_id=2)
    assert rig.writer.state(0) is BookState.RESYNCING
    assert rig.codes("BTC/USD", ev0) == ["RESYNCING"]
    assert rig.out.resyncs[rs0:] == []  # a fresh connection sends snapshots by itself
    rig.keeper.on_frame(0, 1, 21, 1, btc[20], rig.now)  # the old connection, in flight
    rig.feed("BTC/USD", btc[20])  # seq 1 of conn 2, an update: ignored
    apply_ref(ref, btc[20])
    assert rig.l2(since=ev0) == [] and len(rig.writer.published(0)) == 20
    rig.feed("BTC/USD", render_snapshot("BTC/USD", ref, 1, 8))
    (ev,) = rig.l2("BTC/USD", ev0)
    assert ev.conn_id == 2 and ev.snapshot and rig.writer.state(0) is BookState.VALID


def test_stale_notice_and_connection_down_mark_stale():
    rig, btc, eth, ref, _ = two_pairs()
    for k in range(10):
        rig.feed("BTC/USD", btc[k])
        rig.feed("ETH/USD", eth[k])
    ev0 = len(rig.out.events)
    rig.keeper.on_control(Stale(7, "BTC/USD", "silent"), rig.now)  # another connection's
    assert rig.writer.state(0) is BookState.VALID
    rig.keeper.on_control(Stale(1, "BTC/USD", "book silent for 60 s"), rig.now)
    assert rig.writer.state(0) is BookState.STALE and rig.writer.state(1) is BookState.VALID
    assert rig.codes("BTC/USD", ev0) == ["STALE"]
    rig.feed("BTC/USD", btc[10])  # data again, checksum verified: valid
    assert rig.writer.state(0) is BookState.VALID
    assert rig.codes("BTC/USD", ev0) == ["STALE", "VALID"]
    ev1 = len(rig.out.events)
    rig.keeper.on_control(ConnectionState(1, False, "closed by peer"), rig.now)
    assert rig.writer.state(0) is rig.writer.state(1) is BookState.STALE
    assert rig.codes("BTC/USD", ev1) == ["STALE"] and rig.codes("ETH/USD", ev1) == ["STALE"]
    rig.feed("BTC/USD", btc[11])  # a straggler of the dead connection: no book from it
    assert rig.l2(since=ev1) == [] and rig.writer.state(0) is BookState.STALE


def test_too_many_resyncs_raise_exactly_one_trigger():
    rig, btc, eth, ref, _ = two_pairs(max_resyncs=3)
    bad_snapshot = corrupt(btc[0])
    for _ in range(8):
        rig.feed("BTC/USD", bad_snapshot)
        rig.feed("ETH/USD", eth[0])
    assert len(rig.out.resyncs) == 8
    assert all(r.pairs == ("BTC/USD",) for r in rig.out.resyncs)
    (topic, trig), = rig.triggers()
    assert topic == "trigger" and trig.pair == "BTC/USD"
    assert "BTC/USD" in trig.reason and trig.error_code == "RESYNC_BUDGET_EXCEEDED"
    assert rig.keeper.counters["triggers"] == 1
    assert rig.writer.state(1) is BookState.VALID and len(rig.l2("ETH/USD")) == 8


def extreme_snapshot(ref: Book, qty_ticks: int) -> bytes:
    """`ref` as a snapshot whose 4th bid has `qty_ticks` (BTC/USD, 1/8), checksum right."""
    bids = ref.bids()
    bids[3] = (bids[3][0], qty_ticks)
    book = Book("BTC/USD", 10)
    book.apply(True, bids, ref.asks())
    frame = render_snapshot("BTC/USD", book, 1, 8)
    assert ticks_to_decimal(qty_ticks, 8).encode() in frame
    return frame


def test_largest_uint64_value_is_published_exactly():
    rig, btc, eth, ref, _ = two_pairs()
    rig.feed("BTC/USD", btc[0])
    apply_ref(ref, btc[0])
    rig.feed("BTC/USD", extreme_snapshot(ref, 2**64 - 1))
    assert rig.writer.state(0) is BookState.VALID
    ev = rig.l2("BTC/USD")[-1]
    assert ev.bids[3][1] == "184467440737.09551615"
    assert rig.writer.published(0)[-1][2][3][1] == 2**64 - 1


@pytest.mark.parametrize("huge", [2**64, 2**64 + 12345, 10**30])
def test_value_beyond_uint64_halts_that_pair_only(huge):
    rig, btc, eth, ref, _ = two_pairs()
    for k in range(10):
        rig.feed("BTC/USD", btc[k])
        rig.feed("ETH/USD", eth[k])
    apply_ref(ref, btc[0])
    frame = extreme_snapshot(ref, huge)  # a value >= 2**64 ticks at precision 8
    ev0, rs0, _ = rig.mark()
    rig.feed("BTC/USD", frame)
    assert rig.writer.state(0) is BookState.HALTED
    (sysev,) = rig.system("BTC/USD", ev0)
    assert sysev.status_code == "INTEGRITY" and str(huge) in sysev.status_message
    assert rig.l2(since=ev0) == [] and rig.triggers() == [] and rig.out.resyncs[rs0:] == []
    assert len(rig.writer.published(0)) == 11  # tried, nothing written (state HALTED)
    # the pair stays halted, whatever comes; the other pair goes on
    rig.feed("BTC/USD", btc[0])
    rig.info("BTC/USD", conn_id=5)
    rig.feed("BTC/USD", btc[0])
    for k in range(10, 20):
        rig.feed("ETH/USD", eth[k])
    assert rig.writer.state(0) is BookState.HALTED and rig.l2("BTC/USD", ev0) == []
    assert len(rig.l2("ETH/USD", ev0)) == 10 and rig.writer.state(1) is BookState.VALID
    assert rig.keeper.counters["halted_pairs"] == 1


def test_crossed_book_resyncs():
    rig, btc, eth, ref, _ = two_pairs()
    for k in range(10):
        rig.feed("BTC/USD", btc[k])
        apply_ref(ref, btc[k])
    ask = ref.best_ask()[0]
    frame = (b'{"channel":"book","type":"update","data":[{"symbol":"BTC/USD","bids":'
             b'[{"price":%s,"qty":1.00000000}],"asks":[],"checksum":1,'
             b'"timestamp":"2023-07-30T15:30:00.000000Z"}]}' % ticks_to_decimal(ask + 5, 1).encode())
    ev0, rs0, _ = rig.mark()
    rig.feed("BTC/USD", frame)
    (req,) = rig.out.resyncs[rs0:]
    assert req.pairs == ("BTC/USD",) and "crossed" in req.reason
    assert rig.writer.state(0) is BookState.RESYNCING and rig.l2(since=ev0) == []
    assert rig.keeper.counters["crossed"] == 1


@pytest.mark.parametrize("bad", [
    "truncated", "not json", "unknown type", "too many decimals"])
def test_decode_error_resyncs(bad):
    rig, btc, eth, ref, _ = two_pairs()
    for k in range(10):
        rig.feed("BTC/USD", btc[k])
        rig.feed("ETH/USD", eth[k])
    frame = {
        "truncated": btc[10][: len(btc[10]) // 2],
        "not json": b"\x00garbage",
        "unknown type": btc[10].replace(b'"type":"update"', b'"type":"delta"'),
        "too many decimals": btc[10].replace(b'"checksum"', b'"x":1,"checksum"').replace(
            b'"qty":', b'"qty":0.000000001,"q":', 1),
    }[bad]
    assert frame != btc[10]
    ev0, rs0, _ = rig.mark()
    rig.feed("BTC/USD", frame)
    (req,) = rig.out.resyncs[rs0:]
    assert req.pairs == ("BTC/USD",)
    assert rig.keeper.counters["decode_errors"] == 1
    assert rig.writer.state(0) is BookState.RESYNCING and rig.l2(since=ev0) == []
    rig.feed("ETH/USD", eth[10])
    assert len(rig.l2("ETH/USD", ev0)) == 1


# --------------------------------------------------------------------------------------
# exchange timestamps

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@PROPS
@given(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2200, 12, 31)),
       st.integers(0, 10**12 - 1), st.integers(0, 12),
       st.sampled_from(["Z", "z", "+00:00", "-05:30", "+14:00"]))
def test_exchange_ts_matches_rfc3339(dt, frac, digits, zone):
    text = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if digits:
        text += "." + str(frac).rjust(12, "0")[:digits]
    text += zone
    want = rfc3339_to_ns(text)
    assert exchange_ts_ns(text) == want
    assert exchange_ts_ns(text) == want  # again, from the minute cache
    if zone == "Z" and digits:
        whole = (dt.replace(tzinfo=UTC) - EPOCH) // timedelta(seconds=1)
        assert want // 10**9 == whole


TS_CHARS = "0123456789-:.TZz+ _x\u0661"


@PROPS
@given(st.integers(0, 27), st.text(alphabet=TS_CHARS, min_size=1, max_size=3))
def test_exchange_ts_garbage_is_zero_or_rfc3339(pos, junk):
    text = "2023-07-30T15:29:58.343415Z"
    text = text[:pos] + junk + text[pos + 1:]
    try:
        want = rfc3339_to_ns(text)
    except SchemaError:
        want = 0
    assert exchange_ts_ns(text) == want


@pytest.mark.parametrize("text", [
    "", None, "garbage", "2023-07-30T15:29:99.5Z", "2023-07-30T15:29:+1.5Z",
    "2023-07-30T15:29:01.-5Z", "2023-07-30T15:29:01.1_2Z", "2023-07-30T15:29:01. 2Z",
    "2023-07-30T15:29:60.0Z", "2023-13-30T15:29:01.5Z", "2023-07-30T15:29:01.Z",
    "2023-07-30 15:29:01.5Z", "2023-07-30T15:29:0\u0661.5Z"])
def test_exchange_ts_garbage_is_zero(text):
    assert exchange_ts_ns(text) == 0


@settings(max_examples=400, deadline=None)
@given(price=st.integers(0, 2**70), qty=st.integers(0, 2**70), pp=st.integers(0, 18),
       qp=st.integers(0, 18))
def test_level_format_is_exact_decimal_text(price, qty, pp, qp):
    """The one-shot divmod rendering equals bus.schema.ticks_to_decimal, zeros kept."""
    frag = level_format(pp, qp) % (*divmod(price, 10**pp), *divmod(qty, 10**qp))
    assert frag == b'["%s","%s"]' % (ticks_to_decimal(price, pp).encode(),
                                     ticks_to_decimal(qty, qp).encode())


def test_precision_change_mid_connection_awaits_a_fresh_snapshot():
    """A PairInfo with new precisions on the same connection (Kraken changed the pair's
    instrument): old-precision updates must not be applied to the emptied book; the
    snapshot at the new precision makes the book valid again, rendered at it."""
    (pp, qp), frames = synthetic_frames("BTC/USD", 10, 5)
    rig = Rig({"BTC/USD": (pp, qp)}, 10)
    rig.info("BTC/USD")
    for f in frames[:3]:
        rig.feed("BTC/USD", f)
    assert rig.writer.state(0) == BookState.VALID
    book = Book("BTC/USD", 10)
    for f in frames[:3]:
        (u,) = decode_book(f, {"BTC/USD": (pp, qp)})
        book.apply(u.snapshot, u.bids, u.asks)
    rig.prec["BTC/USD"] = (pp + 1, qp)
    rig.info("BTC/USD")  # same conn_id, new price precision
    events, resyncs, _ = rig.mark()
    rig.feed("BTC/USD", frames[3])  # an update still at the old precision: ignored
    assert rig.keeper.counters["mismatches"] == 0 and not rig.l2(since=events)
    scaled = Book("BTC/USD", 10)
    scaled.apply(True, [(p * 10, q) for p, q in book.bids()], [(p * 10, q) for p, q in book.asks()])
    rig.feed("BTC/USD", render_snapshot("BTC/USD", scaled, pp + 1, qp))
    (ev,) = rig.l2(since=events)
    assert ev.snapshot and ev.price_precision == pp + 1
    assert ev.bids[0][0] == ticks_to_decimal(scaled.bids()[0][0], pp + 1)
    assert rig.writer.state(0) == BookState.VALID


def test_missing_snapshot_is_asked_again_but_never_for_a_dead_connection():
    """on_tick retries a resync whose snapshot does not come, on the live connection;
    after ConnectionState(down) it waits for the next connection instead: requests
    about a dead connection are ignored by ingest and must not use up the resync
    budget (a Kraken outage longer than a few retries would otherwise halt)."""
    rig, btc, eth, ref, _ = two_pairs(max_resyncs=3, resync_retry_ns=2_000 * MS)
    rig.feed("ETH/USD", eth[0])
    rig.feed("BTC/USD", btc[0])
    rig.feed("BTC/USD", corrupt(btc[1]))
    assert [r.reason[:17] for r in rig.out.resyncs] == ["checksum mismatch"]
    rig.now += 2_500 * MS
    rig.keeper.on_tick(rig.now)
    assert rig.out.resyncs[1:] == [ResyncRequest(("BTC/USD",), "snapshot still missing", 1)]
    rig.keeper.on_control(ConnectionState(1, False, "no heartbeat"), rig.now)
    assert rig.writer.state(0) is BookState.STALE
    _, resyncs, _ = rig.mark()
    for _ in range(10):  # a long outage: nothing to ask, nothing counted, no trigger
        rig.now += 2_500 * MS
        rig.keeper.on_tick(rig.now)
    assert len(rig.out.resyncs) == resyncs and rig.triggers() == []
    rig.info("BTC/USD", conn_id=2)  # the next connection: its snapshot makes it valid
    rig.feed("BTC/USD", btc[0])
    assert rig.writer.state(0) is BookState.VALID and rig.triggers() == []


def test_publish_lag_is_sampled_every_16th_event_and_read_once():
    pair = "BTC/USD"
    pp, qp = vectors.KNOWN_PRECISIONS[pair]
    rig = Rig({pair: (pp, qp)}, 10)
    rig.info(pair)
    for k, frame in enumerate(book_frames(SDK)[:81]):
        rig.now += MS
        wall = 1_767_225_600 * 10**9 + rig.now  # the rig's clock_ns at this moment
        # event number k + 1 left ingest (k + 1) us before it reaches shared memory
        rig.keeper.on_frame(0, 1, k + 1, wall - (k + 1) * 1000, frame, rig.now)
    assert len(rig.l2()) == 81
    assert rig.keeper.publish_lag() == {  # events 16, 32, 48, 64, 80
        "publish_lag_p50_us": 48.0, "publish_lag_p99_us": 80.0,
        "publish_lag_max_us": 80.0, "publish_lag_samples": 5.0}
    assert rig.keeper.publish_lag() == {}  # read: the next interval starts empty
