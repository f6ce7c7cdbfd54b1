"""The shared-memory ABI and the seqlock, on plain bytearrays (no shared memory)."""

from __future__ import annotations

import ast
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bookd import layout as L
from bookd.book import Book
from bookd.layout import BookState, LayoutError, SeqlockBusy, ValueOutOfRange, WriterClosed
from bookd.seqlock import (
    ASKS,
    BIDS,
    BookPublisher,
    PairWriter,
    SeqlockReader,
    SeqlockWriter,
)

ROOT = Path(__file__).resolve().parents[2]
DEPTHS = (1, 10, 25, 100, 1000)


# --------------------------------------------------------------------------- purity


@pytest.mark.parametrize("module", ["bookd/layout.py", "bookd/seqlock.py"])
def test_core_modules_are_pure(module: str) -> None:
    tree = ast.parse((ROOT / module).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    banned = {"asyncio", "zmq", "picows", "socket", "time", "multiprocessing.shared_memory",
              "multiprocessing", "mmap", "_posixshmem"}
    assert not {m for m in imported if m.split(".")[0] in banned or m in banned}, imported


# --------------------------------------------------------------------------- offsets


def _check_fields(fields: tuple[L.Field, ...], header_size: int) -> None:
    """Scalars back to back from 0 to header_size, naturally aligned; tables after."""
    pos = 0
    for f in fields:
        if f.size is None:  # depth-sized arrays: header_size + (0, 8, 16, 24) * D
            assert f.offset == header_size and f.per_depth in (0, 8, 16, 24), f.name
            continue
        if f.name == "pairs":  # the directory's name table
            assert f.offset == header_size == pos
            continue
        assert f.offset == pos, f"{f.name} at {f.offset}, expected {pos} (gap or overlap)"
        assert f.offset % (8 if f.ctype.startswith("char") else f.size) == 0, f.name
        pos += f.size
    assert pos == header_size


def test_directory_fields_are_contiguous_aligned_and_match_the_struct() -> None:
    _check_fields(L.DIR_FIELDS, L.DIR_HEADER_SIZE)
    assert L.DIR_HEADER.size == L.DIR_HEADER_SIZE == 64
    scalars = [f for f in L.DIR_FIELDS if f.name != "pairs"]
    assert sum(f.size for f in scalars) == L.DIR_HEADER_SIZE
    # Pack distinct values with the Struct, read them back at the documented offsets.
    values = list(range(1, len(scalars) + 1))
    buf = bytearray(L.DIR_HEADER_SIZE)
    L.DIR_HEADER.pack_into(buf, 0, *values)
    for f, v in zip(scalars, values, strict=True):
        fmt = "<Q" if f.size == 8 else "<I"
        assert struct.unpack_from(fmt, buf, f.offset)[0] == v, f.name
    assert (L.D_HEARTBEAT_NS % 8, L.D_GENERATION % 8, L.D_PID % 4) == (0, 0, 0)


def test_pair_fields_are_contiguous_aligned_and_match_the_structs() -> None:
    _check_fields(L.PAIR_FIELDS, L.PAIR_HEADER_SIZE)
    scalars = [f for f in L.PAIR_FIELDS if not f.ctype.endswith("[D]")]
    assert scalars[-1].offset + scalars[-1].size == L.PAIR_HEADER_SIZE == 144
    assert L.PAIR_STATIC.size == L.P_SEQ == 72
    assert L.PAYLOAD_HEAD.size == L.PAIR_HEADER_SIZE - L.P_PAYLOAD == 64
    assert L.P_SEQ % 8 == 0 and L.P_PAYLOAD == L.P_SEQ + 8
    # PAYLOAD_HEAD field order equals the documented order of the protected scalars.
    protected = [f for f in scalars if f.offset >= L.P_PAYLOAD]
    values = list(range(1, len(protected) + 1))
    buf = bytearray(L.PAYLOAD_HEAD.size)
    L.PAYLOAD_HEAD.pack_into(buf, 0, *values)
    for f, v in zip(protected, values, strict=True):
        fmt = "<Q" if f.size == 8 else "<I"
        assert struct.unpack_from(fmt, buf, f.offset - L.P_PAYLOAD)[0] == v, f.name


@pytest.mark.parametrize("depth", DEPTHS)
def test_geometry_per_depth(depth: int) -> None:
    g = L.pair_geometry(depth)
    arrays = [f for f in L.PAIR_FIELDS if f.ctype.endswith("[D]")]
    assert [f.at(depth) for f in arrays] == [g.bid_prices, g.bid_qtys, g.ask_prices,
                                             g.ask_qtys]
    assert g.size == L.pair_segment_size(depth) == 144 + 32 * depth
    assert g.size % 8 == 0 and all(off % 8 == 0 for off in g[1:5])
    assert g.publish.size == g.size - L.P_PUBLISH  # the publish block runs to the end
    assert L.dir_segment_size(3) % 8 == 0


def test_docs_embed_the_generated_tables() -> None:
    doc = (ROOT / "docs" / "shm-layout.md").read_text()
    assert L.describe_markdown() in doc, "docs/shm-layout.md is out of date: paste " \
        "the output of `python -m bookd.layout`"


def test_names() -> None:
    assert L.directory_name("ns1") == "ns1.books"
    assert L.pair_segment_name("ns1", "BTC/USD") == "ns1.book.BTC_USD"
    assert L.decode_name(L.encode_name("XBT/EUR")) == "XBT/EUR"
    assert len(L.encode_name("A" * 19 + "/" + "B" * 19)) == L.NAME_WIDTH
    for bad in ("", "a/b", "a b", "x" * 65, "ns\n", "a.book"):
        with pytest.raises(ValueError):
            L.directory_name(bad)
    for bad in ("BTC_USD", "BTC/USD/EUR", "", "A" * 20 + "/" + "B" * 20, "BTC/\x00",
                "BTC/USD\n"):
        with pytest.raises(ValueError):
            L.pair_segment_name("ns", bad)


def test_states_and_the_stale_rule() -> None:
    assert [s.value for s in BookState] == [0, 1, 2, 3, 4]
    assert [s.word for s in BookState] == ["empty", "valid", "resyncing", "stale", "halted"]
    assert L.effective_state(1, True) is BookState.VALID
    assert L.effective_state(1, False) is BookState.STALE
    assert L.effective_state(2, False) is BookState.STALE
    assert L.effective_state(4, False) is BookState.HALTED  # a halt is final
    assert L.effective_state(99, True) is BookState.STALE   # unknown: do not trust
    second = 1_000_000_000
    assert L.writer_alive(0, 5 * second, 5 * second, 100) is False  # closed
    assert L.writer_alive(7, 5 * second, 5 * second + 50_000_000, 100) is True
    assert L.writer_alive(7, 5 * second, 5 * second + 400_000_000, 100) is None  # check pid
    assert L.writer_alive(7, 5 * second, 6 * second + 1, 100) is False  # > 1 s


# --------------------------------------------------------------------------- seqlock


def test_seqlock_round_trip_on_a_bytearray() -> None:
    buf = bytearray(64)
    w = SeqlockWriter(buf, 8, 16, 48)
    r = SeqlockReader(buf, 8, 16, 48)
    assert r.read() == bytes(32) and w.seq == 0
    w.write(b"\x01" * 32)
    assert r.read() == b"\x01" * 32
    assert w.seq == 2 and struct.unpack_from("<Q", buf, 8)[0] == 2
    assert buf[:8] == bytes(8) and buf[48:] == bytes(16)  # nothing outside the region
    token = r.begin()
    assert token == 2 and r.validate(token)
    w.begin()  # a write in progress
    assert r.begin() is None and r.try_read() is None
    with pytest.raises(SeqlockBusy):
        r.read(tries=10)
    assert not r.validate(token)
    w.end()
    assert r.read_versioned() == (4, b"\x01" * 32)
    assert r.retries >= 11


def test_seqlock_writer_repairs_an_odd_counter_and_rejects_bad_layouts() -> None:
    buf = bytearray(32)
    struct.pack_into("<Q", buf, 0, 7)  # a writer died mid-write
    assert SeqlockWriter(buf, 0, 8, 32).seq == 8
    assert struct.unpack_from("<Q", buf, 0)[0] == 8
    with pytest.raises(ValueError):
        SeqlockWriter(buf, 4, 8, 32)   # unaligned counter
    with pytest.raises(ValueError):
        SeqlockWriter(buf, 8, 0, 32)   # region covers the counter
    with pytest.raises(ValueError):
        SeqlockWriter(bytes(32), 0, 8, 32)  # read-only


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(min_size=40, max_size=40), min_size=1, max_size=5))
def test_seqlock_every_write_is_read_back(payloads: list[bytes]) -> None:
    buf = bytearray(48)
    w, r = SeqlockWriter(buf, 0, 8, 48), SeqlockReader(buf, 0, 8, 48)
    for k, p in enumerate(payloads, 1):
        w.write(p)
        assert r.read_versioned() == (2 * k, p)


# --------------------------------------------------------------------------- pair writer


def _decode(buf: bytearray, depth: int) -> dict:
    g = L.pair_geometry(depth)
    head = dict(zip(("pp", "qp", "mismatches", "resyncs", "state", "nb", "na", "checksum",
                     "ets", "recv", "updates"), L.PAYLOAD_HEAD.unpack_from(buf, L.P_PAYLOAD),
                    strict=True))
    arrays = [list(struct.unpack_from(f"<{depth}Q", buf, off))
              for off in (g.bid_prices, g.bid_qtys, g.ask_prices, g.ask_qtys)]
    return {**head, "arrays": arrays}


def test_pair_writer_header_and_publish() -> None:
    depth = 10
    bufs = [bytearray(L.pair_segment_size(depth)) for _ in range(2)]
    pub = BookPublisher(bufs, ["BTC/USD", "ETH/USD"], depth, generation=12345)
    magic, version, hsize, d, index, gen, name = L.PAIR_STATIC.unpack_from(bufs[1])
    assert (magic, version, hsize, d, index, gen) == (L.PAIR_MAGIC, 1, 144, 10, 1, 12345)
    assert bufs[1][:8] == b"KFBKPAIR" and L.decode_name(name) == "ETH/USD"
    assert _decode(bufs[0], depth)["state"] == BookState.EMPTY
    pub.set_precision(0, 1, 8)
    pub.count(0, mismatches=2)
    pub.count(0, resyncs=1)
    big = 2**64 - 1  # the largest representable value is fine
    pub.publish(0, [50001, 50000], [big, 3], [50002], [7], checksum=0xFFFFFFFF,
                exchange_ts_ns=11, recv_ns=22)
    v = _decode(bufs[0], depth)
    assert (v["pp"], v["qp"], v["mismatches"], v["resyncs"]) == (1, 8, 2, 1)
    assert (v["state"], v["nb"], v["na"], v["checksum"], v["ets"], v["recv"], v["updates"]) \
        == (BookState.VALID, 2, 1, 0xFFFFFFFF, 11, 22, 1)
    assert v["arrays"] == [[50001, 50000] + [0] * 8, [big, 3] + [0] * 8,
                           [50002] + [0] * 9, [7] + [0] * 9]
    full = list(range(100, 90, -1))
    pub.publish(0, full, full, full, full, checksum=1, exchange_ts_ns=1, recv_ns=1)
    assert _decode(bufs[0], depth)["arrays"] == [full] * 4
    pub.set_state(0, BookState.RESYNCING)
    assert _decode(bufs[0], depth)["state"] == BookState.RESYNCING
    assert _decode(bufs[0], depth)["arrays"] == [full] * 4  # levels kept
    assert pub.seq(0) == 2 * 6 and pub.seq(1) == 0


@pytest.mark.parametrize("bad, field", [
    ({"bid_prices": [2**64, 1]}, "bid_prices[0]"),
    ({"bid_qtys": [-1, 1]}, "bid_qtys[0]"),
    ({"ask_prices": [1, 2**70]}, "ask_prices[1]"),
    ({"ask_qtys": [1, 2**64]}, "ask_qtys[1]"),
    ({"checksum": 2**32}, "checksum"),
    ({"exchange_ts_ns": 2**64}, "exchange_ts_ns"),
    ({"recv_ns": -5}, "recv_ns"),
])
def test_out_of_range_values_are_refused_without_writing(bad: dict, field: str) -> None:
    depth = 10
    buf = bytearray(L.pair_segment_size(depth))
    pub = BookPublisher([buf], ["SHIB/USD"], depth, generation=1)
    pub.publish(0, [3, 2], [1, 1], [4, 5], [1, 1], checksum=9, exchange_ts_ns=1, recv_ns=2)
    before = bytes(buf)
    book = {"bid_prices": [3, 2], "bid_qtys": [1, 1], "ask_prices": [4, 5],
            "ask_qtys": [1, 1], "checksum": 9, "exchange_ts_ns": 1, "recv_ns": 2, **bad}
    with pytest.raises(ValueOutOfRange) as info:
        pub.publish(0, book["bid_prices"], book["bid_qtys"], book["ask_prices"],
                    book["ask_qtys"], checksum=book["checksum"],
                    exchange_ts_ns=book["exchange_ts_ns"], recv_ns=book["recv_ns"])
    assert info.value.field == field and info.value.pair == "SHIB/USD"
    assert isinstance(info.value, OverflowError)
    assert bytes(buf) == before  # not one byte written, counter included


def test_full_depth_out_of_range_and_bad_shapes_write_nothing() -> None:
    depth = 10
    buf = bytearray(L.pair_segment_size(depth))
    pub = BookPublisher([buf], ["BTC/USD"], depth, generation=1)
    before = bytes(buf)
    ok = list(range(1, 11))
    with pytest.raises(ValueOutOfRange):
        pub.publish(0, ok, ok, ok, ok[:9] + [2**64], checksum=1, exchange_ts_ns=1, recv_ns=1)
    with pytest.raises(ValueError):  # more levels than depth
        pub.publish(0, ok + [11], ok + [11], ok, ok, checksum=1, exchange_ts_ns=1, recv_ns=1)
    with pytest.raises(ValueError):  # prices and qtys of different lengths
        pub.publish(0, ok, ok[:9] + [1, 2], ok, ok[:9], checksum=1, exchange_ts_ns=1,
                    recv_ns=1)
    with pytest.raises(TypeError):
        pub.publish(0, [1.5], [1], [], [], checksum=1, exchange_ts_ns=1, recv_ns=1)
    assert bytes(buf) == before


_LEVELS = st.lists(st.tuples(st.integers(1, 60), st.integers(0, 3)), max_size=6)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), _LEVELS, _LEVELS, st.integers(0, 2**32 - 1),
                          st.sampled_from([0, 1, 2**64 - 1, 2**64])), min_size=1,
                max_size=25),
       st.sampled_from([1, 3, 10]))
def test_publish_book_packs_changed_sides_into_the_same_image_as_publish(
        steps: list, depth: int) -> None:
    """publish_book(changed=...) repacks only the sides named, yet after any sequence
    (one-sided updates, out-of-range values that fail, both sides) the segment holds
    exactly what publish() of the whole book writes."""
    bufs = [bytearray(L.pair_segment_size(depth)) for _ in range(2)]
    fast, ref = (BookPublisher([b], ["X/Y"], depth, generation=1) for b in bufs)
    book = Book("X/Y", depth)
    for snapshot, bids, asks, crc, big in steps:
        bids = [(60 - p, q) for p, q in bids]  # bids below 60, asks from 61 up
        asks = [(60 + p, q) for p, q in asks]
        if big != 1 and asks:  # sometimes a value beyond uint64 (the publish fails)
            asks[0] = (asks[0][0], big or 1)
        book.apply(snapshot, bids, asks)
        changed = BIDS | ASKS if snapshot else (BIDS if bids else 0) | (ASKS if asks else 0)
        results = []
        for k, buf in enumerate(bufs):
            before = bytes(buf)
            try:
                if k == 0:
                    fast.publish_book(0, book, changed, crc, 5, 6)
                else:
                    ref.publish(0, book.bid_prices(), book.bid_qtys, book.ask_keys,
                                book.ask_qtys, checksum=crc, exchange_ts_ns=5, recv_ns=6)
                results.append(None)
            except ValueOutOfRange as e:
                assert bytes(buf) == before  # nothing written
                results.append(e.field)
        assert results[0] == results[1]
        assert bufs[0] == bufs[1]


def test_publish_book_repacks_everything_after_a_failed_publish() -> None:
    """A failed pack may have scribbled on the scratch image: the next publish_book
    packs both sides, whatever `changed` says."""
    bufs = [bytearray(L.pair_segment_size(10)) for _ in range(2)]
    fast, ref = (BookPublisher([b], ["X/Y"], 10, generation=1) for b in bufs)
    book = Book("X/Y", 10)
    book.apply(True, [(50, 1), (49, 2)], [(51, 1), (52, 2)])
    fast.publish_book(0, book, BIDS | ASKS, 1, 2, 3)
    ref.publish_book(0, book, BIDS | ASKS, 1, 2, 3)  # (the same update counter)
    book.apply(False, [(48, 2**64)], [])
    with pytest.raises(ValueOutOfRange):
        fast.publish_book(0, book, BIDS, 1, 2, 3)  # bids partly packed, then refused
    book.apply(False, [(48, 0)], [(53, 1)])  # the bids are back as they were published
    fast.publish_book(0, book, ASKS, 1, 2, 3)
    ref.publish(0, book.bid_prices(), book.bid_qtys, book.ask_keys, book.ask_qtys,
                checksum=1, exchange_ts_ns=2, recv_ns=3)
    assert bufs[0][L.P_PUBLISH:] == bufs[1][L.P_PUBLISH:]


def test_publish_book_repacks_everything_after_publish() -> None:
    """publish() takes levels from the caller, not from the Book: the next publish_book
    cannot trust the image's sides to match its book, so it packs both."""
    bufs = [bytearray(L.pair_segment_size(10)) for _ in range(2)]
    fast, ref = (BookPublisher([b], ["X/Y"], 10, generation=1) for b in bufs)
    book = Book("X/Y", 10)
    book.apply(True, [(50, 1)], [(200, 1)])
    for pub in (fast, ref):
        pub.publish(0, [50], [1], [888], [8], checksum=1, exchange_ts_ns=2, recv_ns=3)
    book.apply(False, [(49, 2)], [])
    fast.publish_book(0, book, BIDS, 1, 2, 3)  # the asks of the image are not the book's
    ref.publish(0, book.bid_prices(), book.bid_qtys, book.ask_keys, book.ask_qtys,
                checksum=1, exchange_ts_ns=2, recv_ns=3)
    assert bufs[0][L.P_PUBLISH:] == bufs[1][L.P_PUBLISH:]


def test_state_precision_and_closed_checks() -> None:
    buf = bytearray(L.pair_segment_size(10))
    pub = BookPublisher([buf], ["BTC/USD"], 10, generation=1)
    with pytest.raises(ValueError):
        pub.set_state(0, 9)
    with pytest.raises(ValueError):
        pub.set_precision(0, -1, 8)
    with pytest.raises(ValueError):
        pub.count(0, mismatches=-1)
    pub._release()
    with pytest.raises(WriterClosed):
        pub.publish(0, [], [], [], [], checksum=0, exchange_ts_ns=0, recv_ns=0)
    with pytest.raises(LayoutError):
        PairWriter(bytearray(100), "BTC/USD", 0, 10, 1)  # too small for depth 10


def test_docs_magic_numbers_match() -> None:
    doc = (ROOT / "docs" / "shm-layout.md").read_text()
    for name, value in (("KF_DIR_MAGIC", L.DIR_MAGIC), ("KF_PAIR_MAGIC", L.PAIR_MAGIC)):
        line = next(ln for ln in doc.splitlines() if ln.startswith(f"#define {name} "))
        assert int(line.split()[2].removesuffix("ULL"), 16) == value, name
