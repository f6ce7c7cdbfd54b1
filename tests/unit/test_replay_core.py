"""The replay server's pure parts, without sockets: recordings, faults, frames, sessions."""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import msgspec
import pytest

from bookd.book import Book
from ingest.wire import decode_book
from replay import frames as F
from replay.faults import (
    CORRUPT,
    FAULT_TABLE,
    SEND,
    SILENCE,
    SKIP,
    FaultError,
    FaultState,
    parse_fault,
)
from replay.recording import RecordingError, RecordingWriter, read_recording, read_recordings
from replay.session import Counters, Session, SessionConfig
from replay.source import BookIndex, RecordingSource, Source, SourceError, SourceEvent

ROOT = Path(__file__).resolve().parents[2]
VECTORS = Path(os.environ.get("KRAKENFEED_VECTORS", ROOT.parent / "shared" / "kraken" / "vectors"))
CAPTURE = VECTORS / "depthcharge_kraken_minagbp_d25_20260816.ndjson"
needs_capture = pytest.mark.skipif(not CAPTURE.exists(), reason=f"{CAPTURE} not found")
PREC = {"MINA/GBP": (4, 8)}


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000_000

    def __call__(self) -> int:
        return self.t


# -------------------------------------------------------------------------------------
# recordings

@needs_capture
def test_depthcharge_capture_reads_verbatim() -> None:
    rec = read_recording(CAPTURE)
    assert rec.kind == "depthcharge" and rec.symbols == ("MINA/GBP",) and rec.depth == 25
    assert rec.skipped_tx == 1 and rec.precisions == {}
    lines = CAPTURE.read_bytes().splitlines()
    for f in rec.frames:                 # each frame is a byte slice of its line
        assert f.frame in lines[f.line - 1]
    assert b'"qty":0.00000000' in b"".join(f.frame for f in rec.frames)
    with pytest.raises(SourceError, match="--price-precision"):
        RecordingSource(rec)
    with pytest.raises(SourceError, match="does not decode at precisions 2/8"):
        RecordingSource(rec, price_precision=2, qty_precision=8)
    src = RecordingSource(rec, price_precision=4, qty_precision=8)
    assert src.stats()["source_checksum_mismatches"] == 0
    assert src.stats()["source_book_frames"] == 30 and "every checksum verifies" in src.describe()


def test_writer_reader_round_trip_plain_and_gzip(tmp_path: Path) -> None:
    frames = [
        b'{"channel":"book","type":"snapshot","data":[{"symbol":"A/B","bids":[{"price":1.0,'
        b'"qty":0.00000000}],"asks":[],"checksum":1,"timestamp":"t"}]}',
        b'{"channel":"instrument","type":"snapshot","data":{"pairs":[{"qty_increment":1e-08,'
        b'"connection_id":15113583034416118705}]}}',
        b'{"channel":"heartbeat",\n "x": 1}',              # a raw newline: whitespace
    ]
    for name in ("r.ndjson", "r.ndjson.gz"):
        p = tmp_path / name
        with RecordingWriter(p, symbols=["A/B"], depth=10, precisions={"A/B": (1, 8)},
                             url="wss://x") as w:
            w.write_frame(1, b'{"method":"ping"}', tx=True)
            for i, f in enumerate(frames):
                w.write_frame(10 + i, f)
            w.write_frame(20, b'{"trunc')                   # not JSON -> raw_b64
            w.write_frame(21, b"\x00\x01", binary=True)
        if name.endswith(".gz"):
            assert p.read_bytes()[:2] == b"\x1f\x8b"
        rec = read_recording(p)
        assert rec.kind == "krakenfeed" and rec.precisions == {"A/B": (1, 8)}
        assert rec.url == "wss://x" and rec.depth == 10
        assert [f.frame for f in rec.frames] == [frames[0], frames[1],
                                                 b'{"channel":"heartbeat",  "x": 1}']
        assert [f.channel for f in rec.frames] == ["book", "instrument", "heartbeat"]
        assert rec.skipped_raw == 2 and rec.skipped_tx == 1


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


HEADER = ('{"format":"krakenfeed-recording","version":1,"symbols":["A/B"],"depth":10,'
          '"precisions":{"A/B":[1,8]}}\n')


def test_reader_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.ndjson", HEADER + '{"rx_ns":1,"frame":{}}\n{"rx_ns":2,"fr\n'
                 '{"rx_ns":3,"frame":{}}\n')
    with pytest.raises(RecordingError, match=r"bad\.ndjson:3: not a recording line"):
        read_recording(bad)
    with pytest.raises(RecordingError, match=r":1: not a recording header"):
        read_recording(_write(tmp_path / "h.ndjson", '{"hello":1}\n'))
    with pytest.raises(RecordingError, match="version"):
        read_recording(_write(tmp_path / "v.ndjson", HEADER.replace('"version":1', '"version":9')))
    with pytest.raises(RecordingError, match="empty"):
        read_recording(_write(tmp_path / "e.ndjson", "\n"))
    with pytest.raises(RecordingError, match="cannot open"):
        read_recording(tmp_path / "missing.ndjson")
    with pytest.raises(RecordingError, match=":2: line has neither"):
        read_recording(_write(tmp_path / "n.ndjson", HEADER + '{"rx_ns":1}\n'))


def test_reader_skips_a_truncated_last_line(tmp_path: Path) -> None:
    text = HEADER + '{"rx_ns":1,"frame":{"channel":"heartbeat"}}\n{"rx_ns":2,"frame":{"chan'
    rec = read_recording(_write(tmp_path / "t.ndjson", text))
    assert len(rec.frames) == 1 and rec.truncated_tail == 1
    gz = tmp_path / "t.ndjson.gz"
    gz.write_bytes(gzip.compress(text.encode())[:-12])     # a cut gzip stream
    rec = read_recording(gz)
    assert rec.truncated_tail == 1


def test_rotated_parts_join_in_order_and_nothing_else_joins(tmp_path: Path) -> None:
    def part(name: str, continues: str | None, sym: str, prec: tuple[int, int], rx: int,
             depth: int = 10) -> Path:
        p = tmp_path / name
        with RecordingWriter(p, symbols=[sym], depth=depth, precisions={sym: prec},
                             continues=continues) as w:
            w.write_frame(rx, b'{"channel":"heartbeat"}')
            w.write_frame(rx + 1, b'{"channel":"trade","data":[]}')
        return p

    a = part("r.0001.ndjson", None, "A/B", (1, 8), 10)
    b = part("r.0002.ndjson.gz", "r.0001.ndjson", "C/D", (2, 4), 20)
    c = part("r.0003.ndjson", "r.0002.ndjson.gz", "A/B", (3, 8), 30)
    rec = read_recordings([a, b, c])
    assert rec.path == str(a) and rec.parts == [str(a), str(b), str(c)]
    assert [f.rx_ns for f in rec.frames] == [10, 11, 20, 21, 30, 31]
    assert [rec.file_of(i) for i in range(6)] == [str(p) for p in (a, a, b, b, c, c)]
    assert rec.symbols == ("A/B", "C/D") and rec.precisions == {"A/B": (3, 8), "C/D": (2, 4)}
    assert read_recording(b).continues == "r.0001.ndjson" and read_recording(a).continues is None

    with pytest.raises(RecordingError, match=r"r\.0003\.ndjson: not the part after "
                                             r"r\.0001\.ndjson: its header says it "
                                             r"continues r\.0002"):
        read_recordings([a, c])
    with pytest.raises(RecordingError, match="not a rotated part"):
        read_recordings([a, part("other.ndjson", None, "A/B", (1, 8), 40)])
    with pytest.raises(RecordingError, match="depth 25 differs from 10"):
        read_recordings([a, part("r.9.ndjson", "r.0001.ndjson", "A/B", (1, 8), 50, 25)])
    with pytest.raises(RecordingError, match="header continues must be"):
        read_recording(_write(tmp_path / "x.ndjson", HEADER.replace('"depth"',
                                                                    '"continues":7,"depth"')))


def test_recording_source_precisions_from_instrument_frame(tmp_path: Path) -> None:
    p = tmp_path / "i.ndjson"
    with RecordingWriter(p, symbols=["A/B"], depth=10, precisions={}) as w:
        w.write_frame(1, b'{"channel":"instrument","type":"snapshot","data":{"assets":[],'
                         b'"pairs":[{"symbol":"A/B","status":"online","price_precision":2,'
                         b'"qty_precision":5}]}}')
        w.write_frame(2, b'{"channel":"book","type":"snapshot","data":[{"symbol":"A/B",'
                         b'"bids":[],"asks":[],"checksum":0}]}')
    src = RecordingSource.from_path(p)
    assert src.precisions == {"A/B": (2, 5)} and src.instrument_frame() is not None
    assert RecordingSource.from_path(p, price_precision=1, qty_precision=1).precisions == {
        "A/B": (1, 1)}
    with pytest.raises(SourceError, match="depth"):
        RecordingSource.from_path(p, depth=25)


# -------------------------------------------------------------------------------------
# faults

def test_every_documented_fault_parses() -> None:
    examples = ["drop", "drop:after=3", "stall", "stall:seconds=1.5", "stall-all",
                "stall-all:seconds=2", "silence:pair=btc/usd", "silence:pair=BTC/USD,seconds=3",
                "corrupt:pair=BTC/USD", "corrupt:pair=BTC/USD,count=always",
                "corrupt:pair=BTC/USD,count=4", "skip:pair=BTC/USD,count=2", "garbage",
                "truncated", "oversized", "oversized:bytes=1000", "status:system=maintenance",
                "refuse:channel=book", "refuse:channel=book,pair=BTC/USD", "slow-acks:ms=250",
                "rate-limit", "rate-limit:count=3"]
    kinds = {parse_fault(e).kind for e in examples}
    assert kinds == {s.split(":")[0].split("[")[0] for s, _ in FAULT_TABLE}
    assert parse_fault("silence:pair=btc/usd").pair == "BTC/USD"
    assert parse_fault("oversized").nbytes == 5 * 1024 * 1024


@pytest.mark.parametrize("spec,match", [
    ("explode", "unknown fault"), ("silence", "needs pair"), ("drop:when=3", "unknown key"),
    ("skip:pair=A/B,count=0", ">= 1"), ("status:system=closed", "one of"),
    ("stall:seconds=-1", "> 0"), ("corrupt:pair", "key=value"),
    ("refuse:channel=ticker", "channel must be"),
])
def test_bad_fault_specs(spec: str, match: str) -> None:
    with pytest.raises(FaultError, match=match):
        parse_fault(spec)


def test_fault_state_counts_and_expiry() -> None:
    clock = Clock()
    fs = FaultState(clock)
    assert not fs.data_active
    fs.arm("corrupt:pair=A/B,count=2")
    fs.arm("skip:pair=C/D")
    assert fs.data_active
    assert [fs.book_action("A/B", clock.t) for _ in range(3)] == [CORRUPT, CORRUPT, SEND]
    assert [fs.book_action("C/D", clock.t) for _ in range(2)] == [SKIP, SEND]
    assert not fs.data_active
    fs.arm("corrupt:pair=A/B,count=always")
    assert all(fs.book_action("A/B", clock.t) == CORRUPT for _ in range(5))
    fs.arm("silence:pair=A/B,seconds=1")
    assert fs.book_action("A/B", clock.t) == SILENCE
    clock.t += 2_000_000_000
    assert fs.book_action("A/B", clock.t) == CORRUPT
    fs.clear()
    fs.arm("drop:after=2")
    assert [fs.data_sent(), fs.data_sent(), fs.data_sent()] == [False, True, False]
    fs.arm("stall:seconds=0.5")
    assert fs.stalled_until(clock.t) == clock.t + 500_000_000
    assert fs.all_stalled_until(clock.t) == 0
    clock.t += 600_000_000
    assert fs.stalled_until(clock.t) == 0
    fs.arm("stall-all")
    assert fs.all_stalled_until(clock.t) == math.inf
    fs.arm("refuse:channel=book,pair=A/B")
    assert fs.take_refusal("book", None) is None and fs.take_refusal("book", "A/B")
    assert fs.take_refusal("book", "A/B") is None
    fs.arm("rate-limit:count=2")
    assert [fs.take_rate_limit() for _ in range(3)] == [True, True, False]
    fs.arm("status:system=cancel_only")
    assert fs.system == "cancel_only" and [f.kind for f in fs.take_pending()] == ["status"]
    fs.clear()                                   # back online, and the clients are told
    assert fs.system == "online" and fs.take_pending()[0].system == "online"
    assert fs.describe() == [] and fs.all_stalled_until(clock.t) == 0


# -------------------------------------------------------------------------------------
# frames

def test_render_ticks_and_increments() -> None:
    assert F.render_ticks(286, 4) == b"0.0286"
    assert F.render_ticks(7419819125726, 8) == b"74198.19125726"
    assert F.render_ticks(0, 8) == b"0.00000000"
    assert F.render_ticks(5100, 8) == b"0.00005100"
    assert F.render_ticks(628070, 1) == b"62807.0"
    assert F.render_ticks(42, 0) == b"42"
    assert [F.increment_text(p) for p in (0, 1, 4, 5, 8)] == [
        b"1", b"0.1", b"0.0001", b"1e-05", b"1e-08"]


def test_ws_frame_headers() -> None:
    for n, head in ((0, b"\x81\x00"), (125, b"\x81\x7d"), (126, b"\x81\x7e\x00\x7e"),
                    (65535, b"\x81\x7e\xff\xff"),
                    (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00")):
        frame = F.ws_frame(b"x" * n)
        assert frame[:len(head)] == head and len(frame) == len(head) + n


@needs_capture
def test_generated_snapshot_is_byte_identical_to_krakens() -> None:
    src = RecordingSource.from_path(CAPTURE, price_precision=4, qty_precision=8)
    snap = src.events_list[0].frame
    (u,) = decode_book(snap, PREC)
    book = Book("MINA/GBP", 25, 4, 8)
    crc = book.apply(True, u.bids, u.asks)
    assert F.book_snapshot("MINA/GBP", book.bids(), book.asks(), 4, 8, crc, u.timestamp) == snap


def test_corrupt_checksum_changes_only_the_value() -> None:
    frame = b'{"data":[{"checksum":2570005138,"timestamp":"t"}]}'
    bad = F.corrupt_checksum(frame)
    value = msgspec.json.decode(bad)["data"][0]["checksum"]
    assert value != 2570005138 and 0 <= value < 2**32
    assert bad.replace(str(value).encode(), b"2570005138") == frame


def test_acks_and_refusals_shapes() -> None:
    a = F.ack("subscribe", {"channel": "book", "depth": 25, "snapshot": True, "symbol": "A/B"},
              "t0", "t1", 7)
    assert a == (b'{"method":"subscribe","result":{"channel":"book","depth":25,"snapshot":true,'
                 b'"symbol":"A/B"},"success":true,"time_in":"t0","time_out":"t1","req_id":7}')
    r = F.error_ack("subscribe", "Subscription depth not supported", "t0", "t1", None)
    assert r == (b'{"error":"Subscription depth not supported","method":"subscribe",'
                 b'"success":false,"time_in":"t0","time_out":"t1"}')
    assert F.rfc3339(1_755_387_424_849_274_123) == "2025-08-16T23:37:04.849274Z"


# -------------------------------------------------------------------------------------
# sessions

def _session(speed: float = 1.0, loop: bool = False, **kw: object) -> tuple[Session, Clock]:
    clock = Clock()
    src = RecordingSource.from_path(CAPTURE, price_precision=4, qty_precision=8)
    cfg = SessionConfig(speed=speed, loop=loop, **kw)  # type: ignore[arg-type]
    return Session(src, FaultState(clock), Counters(), cfg), clock


SUB = b'{"method":"subscribe","params":{"channel":"book","symbol":["MINA/GBP"],"depth":25}}'


def payloads(parts: list[bytes]) -> list[bytes]:
    """The text payloads of the server frames in a pump's parts."""
    data = b"".join(parts)
    out = []
    i = 0
    while i < len(data):
        n = data[i + 1] & 0x7F
        i += 2
        if n == 126:
            n, i = int.from_bytes(data[i:i + 2], "big"), i + 2
        elif n == 127:
            n, i = int.from_bytes(data[i:i + 8], "big"), i + 8
        out.append(data[i:i + n])
        i += n
    return out


@needs_capture
def test_session_paces_by_rx_ns() -> None:
    s, clock = _session(speed=1.0)
    assert s.pump(clock.t, 0).next_at == math.inf        # nothing before a subscription
    assert len(s.receive(SUB, clock.t, 0).frames) == 1
    p = s.pump(clock.t, 0)
    assert payloads(p.parts) == [s.source.events_list[0].frame]   # the snapshot, now
    t1 = s.source.events_list[1].t_ns
    assert p.next_at == clock.t + t1                      # the next frame's due time
    clock.t += t1
    p = s.pump(clock.t, 0)
    assert len(payloads(p.parts)) == 1 and p.next_at > clock.t


@needs_capture
def test_session_stall_pauses_the_timeline() -> None:
    s, clock = _session(speed=1.0)
    s.receive(SUB, clock.t, 0)
    s.pump(clock.t, 0)
    nxt = s.source.events_list[1].t_ns
    s.faults.arm("stall:seconds=10")
    assert s.pump(clock.t, 0).parts == []
    clock.t += 10_000_000_000                             # ten seconds of stall ...
    p = s.pump(clock.t, 0)
    assert p.parts == [] and p.next_at == clock.t + nxt   # ... shift the timeline


@needs_capture
def test_session_rate_limit_and_loop() -> None:
    s, clock = _session(speed=0, loop=True, rate_burst=2, rate_per_s=1.0, batch=45)
    ping = b'{"method":"ping","req_id":1}'
    out = [s.receive(ping, clock.t, 0).frames[0] for _ in range(3)]
    assert out[2] == F.RATE_LIMITED and out[0].startswith(b'{"method":"pong"')
    clock.t += 1_000_000_000                              # one token back
    assert s.receive(SUB, clock.t, 0).frames[0].startswith(b'{"method":"subscribe"')
    p = s.pump(clock.t, 0)
    n = len(s.source.events_list)
    sent = payloads(p.parts)
    assert len(sent) == 45 and p.next_at == 0 and s.counters.loops == 1
    assert sent[n] == sent[0]                             # the loop starts with the snapshot
    snap = s.current_snapshot("MINA/GBP")
    assert snap is not None
    crc = decode_book(snap, PREC)[0].checksum
    assert crc == decode_book(s.source.events_list[44 - n].frame, PREC)[0].checksum
    assert s.source.stats()["source_checksum_mismatches"] == 0


class _Live(Source):
    """The capture as a non-indexed source: the session keeps its own Books."""

    def __init__(self, inner: RecordingSource) -> None:
        self.inner = inner
        self.symbols = inner.symbols
        self.depth = inner.depth
        self.precisions = inner.precisions

    def events(self):  # noqa: ANN201
        return (SourceEvent(e.t_ns, e.channel, e.symbol, e.frame, e.snapshot)
                for e in self.inner.events_list)


@needs_capture
def test_lazy_session_books_equal_the_book_index() -> None:
    src = RecordingSource.from_path(CAPTURE, price_precision=4, qty_precision=8)
    n_books = len(src.events_list)
    small = BookIndex("MINA/GBP", 25, PREC, src.books["MINA/GBP"].events, every=4)
    for cap in (1, 3, 4096):
        s = Session(_Live(src), FaultState(Clock()), Counters(),
                    SessionConfig(speed=0, batch=1, pending_cap=cap))
        assert s.current_snapshot("MINA/GBP") is None
        s.receive(SUB, 0, 0)
        for n in range(1, n_books + 1):
            s.pump(0, 0)
            snap = s.current_snapshot("MINA/GBP")
            assert snap == src.snapshot_frame("MINA/GBP", n) == small.snapshot_frame(n)
        assert s.counters.source_checksum_mismatches == 0
