"""bookd/book.py and bookd/checksum.py: every real checksum, truncation, and a slow reference.

The reference is the seed's design written the slow, obvious way (PROTOCOL.md 3.4): a
`SortedDict` of `Decimal` per side, levels applied in order, then truncation, and the
checksum text built with `format(Decimal, 'f')`, dot removed, leading zeros stripped.
"""

from __future__ import annotations

import zlib
from decimal import Context, Decimal, localcontext

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sortedcontainers import SortedDict

from bookd.book import Book, BookError, CrossedBook
from bookd.checksum import TOP, checksum_chunks, checksum_levels, checksum_text, level_chunk
from ingest.wire import decode_book
from tests import vectors

needs_vectors = pytest.mark.skipif(not vectors.available(),
                                   reason=f"no vectors at {vectors.VECTORS_DIR}")
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EXACT = Context(prec=400)

SDK = "python_kraken_sdk_orderbook_v2_btcusd.jsonl"
DEPTHCHARGE = "depthcharge_kraken_minagbp_d25_20260816.ndjson"
DOCS_BTC = "kraken_docs_btcusd_checksum_example.jsonl"
DOCS_MATIC = "kraken_docs_book_channel_maticusd_example.jsonl"


# --------------------------------------------------------------------------------------
# the slow reference (the seed's way)

def _text(d: Decimal) -> str:
    return format(d, "f").replace(".", "").lstrip("0")


class RefBook:
    """SortedDict[Decimal, Decimal] per side; apply in order, then truncate."""

    def __init__(self, depth: int, pp: int, qp: int) -> None:
        self.depth, self.pp, self.qp = depth, pp, qp
        self.bids: SortedDict = SortedDict()
        self.asks: SortedDict = SortedDict()

    def apply(self, snapshot: bool, bids, asks) -> None:
        with localcontext(EXACT):
            if snapshot:
                self.bids.clear()
                self.asks.clear()
            for side, levels in ((self.bids, bids), (self.asks, asks)):
                for p, q in levels:
                    price = Decimal(p).scaleb(-self.pp)  # the value at its precision
                    qty = Decimal(q).scaleb(-self.qp)
                    if qty == 0:
                        side.pop(price, None)
                    else:
                        side[price] = qty
            while len(self.asks) > self.depth:
                self.asks.popitem(-1)  # worst ask: highest
            while len(self.bids) > self.depth:
                self.bids.popitem(0)  # worst bid: lowest

    def checksum(self) -> int:
        with localcontext(EXACT):
            asks = list(self.asks.items())[:TOP]
            bids = list(reversed(self.bids.items()))[:TOP]
            s = "".join(_text(p) + _text(q) for p, q in asks) + \
                "".join(_text(p) + _text(q) for p, q in bids)
        return zlib.crc32(s.encode()) & 0xFFFFFFFF

    def ticks(self, side: SortedDict, reverse: bool) -> list[tuple[int, int]]:
        with localcontext(EXACT):
            items = reversed(side.items()) if reverse else side.items()
            return [(int(p.scaleb(self.pp)), int(q.scaleb(self.qp))) for p, q in items]

    def ask_ticks(self):
        return self.ticks(self.asks, False)

    def bid_ticks(self):
        return self.ticks(self.bids, True)


def check_invariants(book: Book) -> None:
    for keys, qtys, chunks, frags, neg in (
            (book.ask_keys, book.ask_qtys, book.ask_chunks, book.ask_frags, False),
            (book.bid_keys, book.bid_qtys, book.bid_chunks, book.bid_frags, True)):
        assert len(keys) == len(qtys) == len(chunks) == len(frags) <= book.depth
        assert all(a < b for a, b in zip(keys, keys[1:], strict=False))  # sorted, no dups
        assert all(q > 0 for q in qtys)
        for i, (k, q, c) in enumerate(zip(keys, qtys, chunks, strict=True)):
            if i < TOP:
                assert c is not None, f"lazy chunk {i} missing inside the top 10"
            if c is not None:  # a cached chunk is never stale
                assert c == level_chunk(-k if neg else k, q)


def check_against(book: Book, ref: RefBook, crc: int) -> None:
    check_invariants(book)
    assert book.asks() == ref.ask_ticks()
    assert book.bids() == ref.bid_ticks()
    assert crc == ref.checksum() == book.checksum() == book.last_checksum
    assert crc == checksum_levels(book.asks(), book.bids())


# --------------------------------------------------------------------------------------
# every real checksum

def replay(name: str, depth: int | None = None, check_ref: bool = False):
    """[(line, ok)] for every checksum of a vector file through decode_book + Book."""
    _, frames = vectors.read_file(vectors.VECTORS_DIR / name)
    book = ref = None
    out = []
    for vf in frames:
        if vectors.kind_of(vf.frame) != "book":
            continue
        for u in decode_book(vf.frame, vf.precisions):
            pp, qp = vf.precisions[u.symbol]
            if book is None:
                book = Book(u.symbol, depth or vf.depth, pp, qp)
                ref = RefBook(depth or vf.depth, pp, qp)
            crc = book.apply(u.snapshot, u.bids, u.asks)
            if check_ref:
                ref.apply(u.snapshot, u.bids, u.asks)
                check_against(book, ref, crc)
            out.append((vf.line, crc == u.checksum))
    return out


@needs_vectors
def test_every_real_checksum_verifies():
    per_file = {}
    for path in vectors.vector_files():
        results = replay(path.name, check_ref=True)
        per_file[path.name] = (len(results), sum(ok for _, ok in results))
    assert per_file == {SDK: (510, 510), DEPTHCHARGE: (30, 30), DOCS_BTC: (1, 1),
                        DOCS_MATIC: (2, 2)}
    assert sum(n for n, _ in per_file.values()) == 543


@needs_vectors
def test_without_truncation_the_sdk_fixture_fails_most_checksums():
    """The control of PROTOCOL.md section 4: a non-truncating book passes 60/510."""
    huge = 10**9
    results = replay(SDK, depth=huge)
    assert (len(results), sum(ok for _, ok in results)) == (510, 60)
    for name, n in ((DEPTHCHARGE, 30), (DOCS_BTC, 1), (DOCS_MATIC, 2)):
        assert [ok for _, ok in replay(name, depth=huge)] == [True] * n


@needs_vectors
def test_same_price_twice_in_one_message_applies_in_order():
    _, frames = vectors.read_file(vectors.VECTORS_DIR / SDK)
    by_line = {vf.line: vf for vf in frames}
    (u,) = decode_book(by_line[237].frame, by_line[237].precisions)
    assert len(u.bids) == 2 and u.bids[0][0] == u.bids[1][0] == 294303  # 29430.3 at 1 decimal
    assert u.asks == []

    def book_before(line: int) -> Book:
        b = Book("BTC/USD", 10, 1, 8)
        for vf in frames:
            if vf.line >= line:
                break
            for x in decode_book(vf.frame, vf.precisions):
                b.apply(x.snapshot, x.bids, x.asks)
        return b

    b = book_before(237)
    assert b.apply(False, u.bids, u.asks) == u.checksum
    assert dict(b.bids())[294303] == 656805344  # the later of the two wins
    b = book_before(237)
    assert b.apply(False, u.bids[::-1], u.asks) != u.checksum  # order matters


@needs_vectors
def test_kraken_worked_example_strings_and_crc():
    meta, (vf,) = vectors.read_file(vectors.VECTORS_DIR / DOCS_BTC)
    (u,) = decode_book(vf.frame, vf.precisions)
    book = Book(u.symbol, 10, 1, 8)
    assert book.apply(u.snapshot, u.bids, u.asks) == u.checksum == 3310070434
    text = checksum_text(book.asks(), book.bids())
    assert text == meta["expected_asks_string"] + meta["expected_bids_string"]
    assert zlib.crc32(text.encode()) == 3310070434
    assert checksum_text(u.asks, u.bids) == text
    # the docs' step-by-step example: ask 45285.2 / 0.00100000 -> "452852100000"
    assert level_chunk(*book.asks()[0]) == b"452852100000"


def test_kraken_v1_worked_example():
    """PROTOCOL.md 3.2: the v1 docs example, input `50055005010500...4950500`, CRC 974947235.

    Levels as in Kraken's v1 docs (price precision 5, qty 0.00000500 everywhere): asks
    0.05005 to 0.05050 by 0.00005, bids 0.05000 down to 0.04950 without 0.04985.
    """
    asks = [(5005 + 5 * i, 500) for i in range(10)]
    bids = [(p, 500) for p in (5000, 4995, 4990, 4980, 4975, 4970, 4965, 4960, 4955, 4950)]
    text = checksum_text(asks, bids)
    assert text.startswith("50055005010500") and text.endswith("4950500")
    book = Book("XBT/USD", 10, 5, 8)
    assert book.apply(True, bids, asks) == 974947235 == checksum_levels(asks, bids)
    ref = RefBook(10, 5, 8)
    ref.apply(True, bids, asks)
    assert ref.checksum() == 974947235


# --------------------------------------------------------------------------------------
# random streams against the reference

QTY = st.one_of(st.just(0), st.just(0), st.integers(1, 10), st.integers(1, 10**9),
                st.integers(2**64, 2**64 + 10**3))


@st.composite
def streams(draw):
    depth = draw(st.sampled_from([10, 10, 25, 100, 5]))
    pp, qp = draw(st.integers(0, 8)), draw(st.integers(0, 8))
    base = draw(st.sampled_from([1, 10**5, 2**64, 10**25]))  # prices above 2**64 ticks too
    width = draw(st.integers(3, depth + 30))
    bid = st.tuples(st.integers(base, base + width - 1), QTY)
    ask = st.tuples(st.integers(base + width, base + 2 * width - 1), QTY)
    msgs = []
    for i in range(draw(st.integers(1, 10))):
        if i == 0 or draw(st.integers(0, 7)) == 0:
            nb = draw(st.integers(0, depth + 15))
            na = draw(st.integers(0, depth + 15))
            bids = draw(st.lists(bid, min_size=nb, max_size=nb))
            asks = draw(st.lists(ask, min_size=na, max_size=na))
            if draw(st.booleans()):  # a well-formed snapshot (the core's fast path)
                bids = sorted({p: q for p, q in bids if q}.items(), reverse=True)
                asks = sorted({p: q for p, q in asks if q}.items())
            msgs.append((True, bids, asks))
        else:
            msgs.append((False, draw(st.lists(bid, max_size=6)), draw(st.lists(ask, max_size=6))))
    return depth, pp, qp, msgs


@PROPS
@given(streams())
def test_random_streams_equal_the_reference(stream):
    depth, pp, qp, msgs = stream
    book = Book("X/Y", depth, pp, qp)
    ref = RefBook(depth, pp, qp)
    for snapshot, bids, asks in msgs:
        crc = book.apply(snapshot, bids, asks)
        ref.apply(snapshot, bids, asks)
        check_against(book, ref, crc)


@PROPS
@given(st.sampled_from([25, 100, 1000]), st.integers(11, 140), st.data())
def test_lazy_chunks_after_deletes_inside_the_top_10(depth, n, data):
    asks = [(10_000 + 3 * i, 1 + i) for i in range(n)]
    bids = [(9_999 - 3 * i, 2 + i) for i in range(n)]
    book = Book("X/Y", depth, 1, 8)
    ref = RefBook(depth, 1, 8)
    crc = book.apply(True, bids, asks)
    ref.apply(True, bids, asks)
    assert book.ask_chunks[TOP:].count(None) == min(n, depth) - TOP  # lazily formatted
    check_against(book, ref, crc)
    for _ in range(data.draw(st.integers(1, 25))):
        side = data.draw(st.sampled_from(["asks", "bids"]))
        levels = book.asks() if side == "asks" else book.bids()
        if not levels:
            continue
        op = data.draw(st.sampled_from(["delete", "delete", "delete", "replace", "insert"]))
        i = data.draw(st.integers(0, min(TOP, len(levels)) - 1))
        price = levels[i][0]
        if op == "delete":
            lv = [(price, 0)]
        elif op == "replace":
            lv = [(levels[data.draw(st.integers(0, len(levels) - 1))][0],
                   data.draw(st.integers(1, 10**12)))]
        else:
            step = 1 if side == "asks" else -1
            lv = [(price + step, data.draw(st.integers(1, 10**12)))]  # between levels
        upd = (False, [], lv) if side == "asks" else (False, lv, [])
        crc = book.apply(*upd)
        ref.apply(*upd)
        check_against(book, ref, crc)


@pytest.mark.parametrize("depth", [1, 3, 5, 9])
def test_depths_below_10_checksum_only_what_the_book_holds(depth):
    asks = [(100 + i, 1 + i) for i in range(12)]
    bids = [(99 - i, 5 + i) for i in range(12)]
    for snapshot_bids, snapshot_asks in ((bids, asks), (bids[::-1], asks[::-1])):
        book = Book("X/Y", depth)
        ref = RefBook(depth, 0, 0)
        crc = book.apply(True, snapshot_bids, snapshot_asks)
        ref.apply(True, snapshot_bids, snapshot_asks)
        assert len(book.asks()) == len(book.bids()) == depth
        check_against(book, ref, crc)


def test_updates_below_the_top_10_repeat_the_checksum():
    book = Book("X/Y", 25)
    crc = book.apply(True, [(100 - i, 1) for i in range(25)], [(101 + i, 1) for i in range(25)])
    assert book.apply(False, [(80, 7)], [(130, 0), (120, 9)]) == crc
    assert book.apply(False, [(95, 7)], []) != crc


# --------------------------------------------------------------------------------------
# integrity errors

def test_crossed_and_locked_books_raise_after_applying():
    book = Book("X/Y", 10)
    book.apply(True, [(99, 1), (98, 1)], [(101, 1), (102, 1)])
    with pytest.raises(CrossedBook) as ei:
        book.apply(False, [(101, 5)], [])  # locked: bid == ask
    assert isinstance(ei.value, BookError)
    assert (ei.value.symbol, ei.value.bid, ei.value.ask) == ("X/Y", 101, 101)
    assert book.best_bid() == (101, 5)  # applied before raising
    assert book.last_checksum == checksum_levels(book.asks(), book.bids())
    with pytest.raises(CrossedBook):
        Book("X/Y", 10).apply(True, [(105, 1)], [(101, 1)])
    with pytest.raises(CrossedBook):
        book.apply(False, [], [(50, 1)])


def test_one_sided_and_empty_books_are_fine():
    book = Book("X/Y", 10)
    assert book.apply(True, [], []) == zlib.crc32(b"")
    assert book.apply(False, [(5, 1)], []) == zlib.crc32(b"51")
    assert book.apply(False, [(5, 0), (6, 0)], [(7, 0)]) == zlib.crc32(b"")
    assert len(book) == 0 and book.best_bid() is None and book.best_ask() is None


def test_the_cached_checksum_parts_follow_one_sided_updates_and_clear():
    """Book.apply keeps the untouched side's part of the checksum (crc32 of the asks text,
    the bids text); clear() and a snapshot must drop both."""
    book = Book("X/Y", 10)
    book.apply(True, [(99, 1), (98, 2)], [(101, 3), (102, 4)])
    for bids, asks in (([(97, 5)], []), ([], [(103, 6)]), ([(99, 0)], []), ([], [(101, 0)]),
                       ([(96, 7)], [(104, 8)])):
        crc = book.apply(False, bids, asks)
        assert crc == book.checksum() == checksum_levels(book.asks(), book.bids())
    book.clear()
    assert book.apply(False, [(5, 1)], []) == zlib.crc32(b"51")  # no stale asks part
    assert book.apply(True, [], [(7, 2)]) == zlib.crc32(b"72")  # no stale bids part


def test_book_rejects_a_depth_below_1():
    with pytest.raises(ValueError):
        Book("X/Y", 0)


def test_checksum_chunks_is_crc32_of_asks_then_bids():
    a = [level_chunk(452852, 100000), level_chunk(452864, 154571953)]
    b = [level_chunk(452835, 10000000)]
    assert checksum_chunks(a, b) == zlib.crc32(b"".join(a + b))
    assert level_chunk(10**20, 5) == b"1000000000000000000005"
