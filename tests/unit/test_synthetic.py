"""The synthetic market (replay/synthetic/): reproducible, Kraken-shaped, checksums right.

Every book frame goes through the real decoder (ingest.wire.decode_book) and a client
`Book` at the subscribed depth, exactly as bookd would consume it.
"""

from __future__ import annotations

import re
from itertools import islice

import pytest

from bookd.book import Book, CrossedBook
from ingest.wire import (
    InstrumentMessage,
    OhlcMessage,
    TradeMessage,
    decode_book,
    decode_message,
)
from replay.source import SourceEvent
from replay.synthetic import (
    STATUSES,
    SyntheticMarket,
    SyntheticSource,
    render,
    rfc3339,
)

PAIRS = ["BTC/USD", "ETH/USD", "PEPE/USD", "SHIB/USD", "SYN5/USD"]
RFC3339_US = re.compile(rb'"timestamp":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"')
LEVEL = re.compile(rb'\{"price":([0-9.]+),"qty":([0-9.]+)\}')


def frames(m: SyntheticMarket, n_book: int) -> list[tuple[str, str, bytes]]:
    out = []
    while m.counts["book"] < n_book:
        out.append(m.next_frame())
    return out


class Client:
    """A correct Kraken client: snapshot, then every update, checksum on each message."""

    def __init__(self, m: SyntheticMarket) -> None:
        self.prec = m.precisions
        self.depth = m.depth
        self.books: dict[str, Book] = {}
        self.checked = 0
        for s in m.symbols:
            self.feed(m.snapshot_frame(s))

    def feed(self, frame: bytes) -> list:
        ups = decode_book(frame, self.prec)
        for u in ups:
            book = self.books.setdefault(u.symbol, Book(u.symbol, self.depth))
            assert book.apply(u.snapshot, u.bids, u.asks) == u.checksum
            self.checked += 1
        return ups


def test_render_keeps_exact_decimals() -> None:
    assert render(5100, 8) == "0.00005100"
    assert render(0, 8) == "0.00000000"
    assert render(628065, 1) == "62806.5"
    assert render(12345, 9) == "0.000012345"
    assert render(123, 0) == "123"
    assert render(2**64 - 1, 8) == "184467440737.09551615"
    assert rfc3339(1_767_225_600_123_456_789) == "2026-01-01T00:00:00.123456Z"
    assert rfc3339(1_767_225_600_123_456_789, 9) == "2026-01-01T00:00:00.123456789Z"


def test_same_seed_same_bytes_other_seed_other_market() -> None:
    a = frames(SyntheticMarket(PAIRS, 25, 42), 500)
    b = frames(SyntheticMarket(PAIRS, 25, 42), 500)
    c = frames(SyntheticMarket(PAIRS, 25, 43), 500)
    assert a == b
    assert a != c
    assert SyntheticMarket(PAIRS, 25, 42).instrument_frame() == \
        SyntheticMarket(PAIRS, 25, 42).instrument_frame()


@pytest.mark.parametrize("depth", [10, 25, 100, 1000])
def test_every_checksum_verifies_through_a_client_book(depth: int) -> None:
    m = SyntheticMarket(PAIRS, depth, depth, check=True)
    client = Client(m)
    n = 3000 if depth < 1000 else 600
    for ch, sym, frame in frames(m, n):
        if ch == "book":
            (u,) = client.feed(frame)
            assert u.symbol == sym and not u.snapshot
            book = client.books[sym]
            # refills keep the client book full: both sides always hold `depth` levels
            assert len(book.bid_keys) == depth and len(book.ask_keys) == depth
            assert RFC3339_US.search(frame)
    assert client.checked == n + len(PAIRS)
    for s in m.symbols:  # a fresh snapshot now matches the client that followed along
        fresh = Book(s, depth)
        (u,) = decode_book(m.snapshot_frame(s), m.precisions)
        assert fresh.apply(True, u.bids, u.asks) == u.checksum == client.books[s].checksum()
        assert len(u.bids) == len(u.asks) == depth


def test_update_shapes_match_kraken() -> None:
    depth = 25
    m = SyntheticMarket(PAIRS, depth, 7)
    client = Client(m)
    levels = removals = pushouts = refills = 0
    sizes = []
    for ch, sym, frame in frames(m, 6000):
        if ch != "book":
            continue
        book = client.books[sym]
        before = {True: book.bids(), False: book.asks()}
        (u,) = client.feed(frame)
        sizes.append(len(u.bids) + len(u.asks))
        for bid, lv in ((True, u.bids), (False, u.asks)):
            if not lv:
                continue
            old = dict(before[bid])
            worst = before[bid][-1][0]
            zeros = [p for p, q in lv if q == 0]
            levels += len(lv)
            removals += len(zeros)
            # a refill: a level from below the old bottom, sent with a visible delete
            below = [p for p, q in lv if q and p not in old and (p < worst if bid else p > worst)]
            if zeros and below:
                refills += 1
            # a push-out: a new level inside the depth, no delete, the old bottom silently gone
            inside = [p for p, q in lv if q and p not in old and (p > worst if bid else p < worst)]
            after = dict(book.bids() if bid else book.asks())
            if inside and not zeros and worst not in after:
                pushouts += 1
    mean = sum(sizes) / len(sizes)
    assert 1.5 <= mean <= 2.1, mean
    assert min(sizes) >= 1 and max(sizes) <= 16
    assert sum(1 for s in sizes if s <= 3) / len(sizes) > 0.8  # mostly 1-3 levels
    assert 0.20 <= removals / levels <= 0.28, removals / levels
    assert refills > 100 and pushouts > 100
    assert m.counts["refills"] > 0 and m.counts["pushouts"] > 0


def test_levels_come_in_no_particular_order_and_kraken_order_is_per_level_safe() -> None:
    m = SyntheticMarket(PAIRS, 10, 3)
    unsorted = 0
    for ch, _, frame in frames(m, 3000):
        if ch == "book":
            (u,) = decode_book(frame, m.precisions)
            for lv in (u.bids, u.asks):
                prices = [p for p, _ in lv]
                unsorted += prices != sorted(prices) and prices != sorted(prices, reverse=True)
    assert unsorted > 50
    # Kraken's own order (delete, refill, insert as they happened): a client that
    # truncates after every level gets the same books as one that truncates per message
    k = SyntheticMarket(PAIRS, 10, 3, shuffle=False, check=True)
    per_msg = Client(k)
    per_level = {s: Book(s, 10) for s in k.symbols}
    for s in k.symbols:
        (u,) = decode_book(k.snapshot_frame(s), k.precisions)
        per_level[s].apply(True, u.bids, u.asks)
    for ch, sym, frame in frames(k, 3000):
        if ch == "book":
            (u,) = per_msg.feed(frame)
            b = per_level[sym]
            for side, lv in [*((0, x) for x in u.bids), *((1, x) for x in u.asks)]:
                try:  # both sides in one message: bids first may cross for a moment
                    b.apply(False, () if side else [lv], [lv] if side else ())
                except CrossedBook:
                    pass
            assert b.checksum() == u.checksum


def test_precisions_and_rendering() -> None:
    m = SyntheticMarket(PAIRS, 25, 5, precisions={"SYN5/USD": (3, 5)})
    prec = m.precisions
    assert prec["BTC/USD"] == (1, 8) and prec["ETH/USD"] == (2, 8)
    assert prec["PEPE/USD"] == (9, 8) and prec["SHIB/USD"] == (10, 8)
    assert prec["SYN5/USD"] == (3, 5)
    seen_zero = trailing_zero = big_meme = 0
    for ch, sym, frame in frames(m, 4000):
        if ch != "book":
            continue
        pp, qp = prec[sym]
        for price, qty in LEVEL.findall(frame):
            p, q = price.decode(), qty.decode()
            assert len(p.split(".")[1]) == pp and len(q.split(".")[1]) == qp, frame
            seen_zero += q == "0." + "0" * qp
            trailing_zero += q.endswith("0") and q.strip("0.") != ""
            # default mode: <= 15 significant digits, and a float renders it back exactly
            ticks = int(q.replace(".", ""))
            assert len(str(ticks).rstrip("0")) <= 15
            assert f"{float(p):.{pp}f}" == p and f"{float(q):.{qp}f}" == q
            big_meme += sym == "PEPE/USD" and float(q) >= 1e9
    assert seen_zero > 100 and trailing_zero > 100 and big_meme > 100


def test_extreme_values_exceed_15_digits_and_stay_below_2_64_ticks() -> None:
    m = SyntheticMarket(PAIRS, 10, 9, extreme=True, check=True)
    client = Client(m)
    long_ = 0
    for ch, _, frame in frames(m, 3000):
        if ch != "book":
            continue
        (u,) = client.feed(frame)
        for _, q in [*u.bids, *u.asks]:
            assert q < 2**64
            long_ += len(str(q).rstrip("0")) > 15
    assert long_ > 200


def test_trades_and_candles_are_consistent() -> None:
    m = SyntheticMarket(["BTC/USD", "PEPE/USD"], 10, 11, trade_ratio=0.2, intervals=(1, 5))
    client = Client(m)
    candles: dict[tuple[str, int], dict] = {}
    trades = 0
    for ch, sym, frame in frames(m, 4000):
        if ch == "book":
            client.feed(frame)
        elif ch == "trade":
            msg = decode_message(frame)
            assert isinstance(msg, TradeMessage)
            (t,) = msg.data
            book = client.books[sym]  # the trade is at the best level of the book as sent
            pp, qp = m.precisions[sym]
            best = book.best_ask() if t.side == "buy" else book.best_bid()
            assert t.price == render(best[0], pp)
            assert int(t.qty.replace(".", "")) <= best[1]
            trades += 1
            last = (t.price, t.qty)
        elif ch == "ohlc":
            msg = decode_message(frame)
            assert isinstance(msg, OhlcMessage)
            (c,) = msg.data
            key = (sym, c.interval)
            p, q = last
            st = candles.get(key)
            if st is None or st["begin"] != c.interval_begin:
                st = candles[key] = {"begin": c.interval_begin, "open": p, "prices": [],
                                     "vol": 0, "n": 0}
            st["prices"].append(int(p.replace(".", "")))
            st["vol"] += int(q.replace(".", ""))
            st["n"] += 1
            assert c.open == st["open"] and c.close == p and c.trades == st["n"]
            pp = m.precisions[sym][0]
            assert c.high == render(max(st["prices"]), pp)
            assert c.low == render(min(st["prices"]), pp)
            assert int(c.volume.replace(".", "")) == st["vol"]
            assert c.interval_begin.endswith(":00.000000000Z")
    assert trades > 500 and len({k[1] for k in candles}) == 2


def test_instrument_snapshot_and_status_changes() -> None:
    m = SyntheticMarket(PAIRS, 10, 1, status_prob=0.02)
    snap = m.instrument_frame()
    assert b'"qty_increment":1e-08' in snap and b'"price_increment":1e-09' in snap
    assert b'"price_increment":0.1' in snap
    msg = decode_message(snap)
    assert isinstance(msg, InstrumentMessage) and msg.type == "snapshot"
    assert {p.symbol: (p.price_precision, p.qty_precision) for p in msg.pairs} == m.precisions
    assert all(p.status == "online" for p in msg.pairs)
    changes = []
    for ch, sym, frame in frames(m, 2000):
        if ch == "instrument":
            u = decode_message(frame)
            assert isinstance(u, InstrumentMessage) and u.type == "update"
            (p,) = u.pairs
            assert p.symbol == sym and p.status in (*STATUSES, "online")
            changes.append(p.status)
    assert 10 < len(changes) < 100 and "online" in changes
    quiet = SyntheticMarket(PAIRS, 10, 1)  # off by default
    assert not [f for f in frames(quiet, 2000) if f[0] == "instrument"]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="BASE/QUOTE"):
        SyntheticMarket(["BTCUSD"], 10, 1)
    with pytest.raises(ValueError, match="repeats"):
        SyntheticMarket(["BTC/USD", "BTC/USD"], 10, 1)
    with pytest.raises(ValueError, match="interval"):
        SyntheticMarket(["BTC/USD"], 10, 1, intervals=(2,))
    with pytest.raises(ValueError, match="depth"):
        SyntheticSource(["BTC/USD"], depth=11)


def test_synthetic_source_streams() -> None:
    src = SyntheticSource(["BTC/USD", "PEPE/USD", "XRP/USD"], depth=25, seed=4, rate=1000.0)
    assert src.symbols == ("BTC/USD", "PEPE/USD", "XRP/USD") and src.depth == 25
    assert src.precisions == {"BTC/USD": (1, 8), "PEPE/USD": (9, 8), "XRP/USD": (5, 8)}
    assert isinstance(decode_message(src.instrument_frame()), InstrumentMessage)
    assert "3 pairs" in src.describe()
    a = list(islice(src.events(), 3000))
    b = list(islice(src.events(), 3000))
    assert all(isinstance(e, SourceEvent) for e in a)
    # snapshots of every symbol first, at t 0; then time never goes back
    assert [(e.t_ns, e.channel, e.snapshot) for e in a[:3]] == [(0, "book", True)] * 3
    assert all(x.t_ns <= y.t_ns for x, y in zip(a, a[1:], strict=False))
    assert {e.channel for e in a} == {"book", "trade", "ohlc"}
    books = {s: Book(s, 25) for s in src.symbols}
    for e in a:
        if e.channel == "book":
            assert e.updates == decode_book(e.frame, src.precisions)  # the decode cache
            (u,) = e.updates
            assert books[e.symbol].apply(u.snapshot, u.bids, u.asks) == u.checksum
        elif e.channel == "ohlc":
            assert e.interval == 1
    # every stream is its own copy of the market: same levels (timestamps from the clock)
    assert [e.updates[0].bids for e in a if e.updates] == \
        [e.updates[0].bids for e in b if e.updates]
    n_book = sum(1 for e in a if e.channel == "book" and not e.snapshot)
    assert a[-1].t_ns == pytest.approx(n_book * 1e6, rel=0.01)  # 1e9 / 1000 per message
    src.set_rate(10.0)
    later = list(islice(src.events(), 13))
    assert later[-1].t_ns == pytest.approx(10 * 1e8, rel=0.2)
    with pytest.raises(ValueError):
        src.set_rate(0)
    short = SyntheticSource(["BTC/USD"], depth=10, seed=1, rate=100.0, duration_s=1.0)
    evs = list(short.events())  # a finite stream ends
    assert sum(1 for e in evs if e.channel == "book" and not e.snapshot) == 100
