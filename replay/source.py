"""What the replay server serves: the `Source` interface and the recording source.

The server (replay/server.py, replay/session.py) does not care where market data comes
from. A `Source` describes a market (symbols, book depth, precisions) and hands out
independent streams of `SourceEvent`s; every connection of the server plays its own
stream, so two clients never disturb each other's pacing or books.

The contract (what `replay.synthetic.SyntheticSource` implements too)
-------------------------------------------------------------------
Attributes, fixed for the life of the source:

* `symbols`: tuple of `BASE/QUOTE` names the source serves. A subscribe for any other
  symbol is refused with Kraken's "Currency pair not supported".
* `depth`: the book depth every book is served at (one of 10, 25, 100, 500, 1000). A
  subscribe at another depth gets Kraken's "Subscription depth not supported".
* `precisions`: `{symbol: (price_precision, qty_precision)}` for every symbol; the
  server decodes book frames at these precisions (ingest.wire.decode_book) and renders
  generated snapshots with exactly these many decimals.

Methods:

* `events()` returns a new, independent iterator of `SourceEvent`s starting at the
  beginning of the stream (a live source: starting now). Each call is a fresh stream;
  the server calls it once per connection, and again on `--loop` when it ends. It may be
  infinite. Rules a stream must keep:
    - `t_ns` is the event's time in ns since the stream started, non-decreasing. The
      server sends an event at `start + t_ns / speed` (all at once for `--speed max`).
    - For every symbol, the first `book` event is a snapshot (`snapshot=True`), so a
      stream is self-contained. A live source emits the current book of every symbol
      as snapshots with `t_ns = 0` at the start of each stream.
    - Every `book` frame is correct for `depth` and `precisions` (Kraken's update
      semantics: levels in ticks at the precision, truncation to depth, checksum of the
      top 10). Every book frame goes through a `bookd.book.Book` (the server's, or the
      source's `BookIndex`), and any whose checksum does not verify is counted
      (`source_checksum_mismatches`).
* `instrument_frame()` returns a verbatim `instrument` snapshot frame to serve on the
  `instrument` channel, or None to let the server synthesize one from `symbols` and
  `precisions` (replay/frames.py `instrument_snapshot`).
* `set_rate(per_s)` changes the event rate of a live source (control command
  `synthetic-rate R`). Sources that cannot raise `NotImplementedError`.
* `describe()` is one line for the log.

Optional, for sources whose streams are all the same (recordings): `indexed = True` and
`snapshot_frame(symbol, n)`, a book snapshot frame of `symbol` as it stands after the
first n book events of that symbol in a stream (None for n = 0). The server then keeps
no books per connection, only counts book events, so `--speed max` costs no book work
per frame; the source keeps the books once for every connection (`BookIndex`). Sources
without it (live ones) get a `bookd.book.Book` per symbol and connection in the server.
`stats()` returns counters for the server's `status` (e.g. how many recorded checksums
verify).

`SourceEvent` carries the frame bytes exactly as they go on the wire (a text frame
payload; recordings splice them in verbatim, never re-serialized). `updates` is
optional pre-decoded levels: a source that knows its levels in ticks may fill it with the
`list[BookUpdate]` that `ingest.wire.decode_book(frame, precisions)` would return, so
the server skips decoding (it never stores decoded levels itself). `ws_header` is the
server's cache of the event's WebSocket frame header; sources leave it None.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path

from bookd.book import Book, BookError
from ingest.wire import (
    BookUpdate,
    InstrumentMessage,
    WireError,
    decode_book,
    decode_message,
    peek_symbol,
)

from .frames import book_snapshot
from .recording import Recording, RecordingError, read_recording, read_recordings

__all__ = ["SourceEvent", "Source", "SourceError", "RecordingSource", "RecordingError",
           "DATA_CHANNELS", "make_event", "BOOK_DEPTHS", "BookIndex", "apply_event",
           "render_book", "OK", "MISMATCH", "BOOK_ERROR", "DECODE_ERROR"]

DATA_CHANNELS = ("book", "trade", "ohlc")
BOOK_DEPTHS = (10, 25, 100, 500, 1000)


class SourceError(ValueError):
    """A source that cannot be served (missing precisions, bad depth, ...)."""


class SourceEvent:
    """One data frame of a stream. See the module docstring for the contract."""

    __slots__ = ("t_ns", "channel", "symbol", "frame", "snapshot", "interval", "updates",
                 "ws_header")

    def __init__(self, t_ns: int, channel: str, symbol: str, frame: bytes,
                 snapshot: bool = False, interval: int = 0,
                 updates: list[BookUpdate] | None = None) -> None:
        self.t_ns = t_ns
        self.channel = channel        # "book" | "trade" | "ohlc"
        self.symbol = symbol
        self.frame = frame            # the text frame payload, verbatim
        self.snapshot = snapshot      # book: a snapshot frame; trade/ohlc: type snapshot
        self.interval = interval      # ohlc: the candle interval in minutes, else 0
        self.updates = updates        # decode cache (book only), see module docstring
        self.ws_header: bytes | None = None  # server cache: the WebSocket frame header

    def __repr__(self) -> str:
        kind = "snapshot" if self.snapshot else "update"
        return f"SourceEvent({self.t_ns}, {self.channel} {kind} {self.symbol}, {len(self.frame)} B)"


class Source(ABC):
    """A market the replay server can serve. See the module docstring for the contract."""

    symbols: tuple[str, ...]
    depth: int
    precisions: dict[str, tuple[int, int]]

    @abstractmethod
    def events(self) -> Iterator[SourceEvent]:
        """A fresh, independent stream from the start (a live source: from now)."""

    def instrument_frame(self) -> bytes | None:
        """A verbatim instrument snapshot frame, or None to synthesize one."""
        return None

    indexed: bool = False

    def snapshot_frame(self, symbol: str, n: int) -> bytes | None:
        """With `indexed`: the book snapshot of `symbol` after its first n book events."""
        raise NotImplementedError

    def stats(self) -> dict[str, int]:
        return {}

    def set_rate(self, per_s: float) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no adjustable rate")

    def describe(self) -> str:
        return f"{type(self).__name__}: {len(self.symbols)} symbols at depth {self.depth}"


_TYPE_SNAPSHOT = b'"type":"snapshot"'
_INTERVAL_KEY = b'"interval":'


def _peek_interval(frame: bytes) -> int:
    i = frame.find(_INTERVAL_KEY)
    if i < 0:
        return 0
    i += len(_INTERVAL_KEY)
    j = i
    while j < len(frame) and 48 <= frame[j] <= 57:
        j += 1
    return int(frame[i:j]) if j > i else 0


def make_event(t_ns: int, channel: str, frame: bytes, symbol: str | None = None) -> SourceEvent:
    """Build an event from a verbatim frame, peeking symbol, type and interval."""
    if symbol is None:
        symbol = peek_symbol(frame) or ""
    return SourceEvent(t_ns, channel, symbol, frame, _TYPE_SNAPSHOT in frame,
                       _peek_interval(frame) if channel == "ohlc" else 0)


# -------------------------------------------------------------------------------------
# books

OK, MISMATCH, BOOK_ERROR, DECODE_ERROR = 0, 1, 2, 3


def apply_event(book: Book, ev: SourceEvent, precisions: dict[str, tuple[int, int]]
                ) -> tuple[int, str | None]:
    """Apply one book event to `book`: (OK | MISMATCH | BOOK_ERROR | DECODE_ERROR, timestamp).

    Uses `ev.updates` when the source filled it, else decodes the frame (not cached:
    long-lived decoded levels would only burden the garbage collector).
    """
    ups = ev.updates
    if ups is None:
        try:
            ups = decode_book(ev.frame, precisions)
        except WireError:
            return DECODE_ERROR, None
    code = OK
    ts = None
    for u in ups:
        if u.symbol != book.symbol:
            continue
        try:
            crc = book.apply(u.snapshot, u.bids, u.asks)
        except BookError:
            code = BOOK_ERROR
            continue
        if crc != u.checksum and code == OK:
            code = MISMATCH
        if u.timestamp:
            ts = u.timestamp
    return code, ts


def render_book(book: Book, timestamp: str | None) -> bytes:
    """A Kraken book snapshot frame of `book` (levels at its precisions, its checksum)."""
    return book_snapshot(book.symbol, book.bids(), book.asks(), book.price_precision,
                         book.qty_precision, book.checksum(), timestamp)


class BookIndex:
    """One symbol's book along a fixed stream, kept once for every connection.

    Built in one pass over the symbol's book events (each decoded and applied to a
    `bookd.book.Book`, its checksum verified): every `every` events the book is kept as
    a rendered snapshot frame (bytes: compact, invisible to the garbage collector).
    `snapshot_frame(n)` restores the nearest checkpoint at or before n and applies at
    most `every - 1` events.
    """

    def __init__(self, symbol: str, depth: int, precisions: dict[str, tuple[int, int]],
                 events: list[SourceEvent], every: int = 256) -> None:
        self.symbol = symbol
        self.depth = depth
        self.precisions = precisions
        self.events = events
        self.every = every
        self.counts = [0, 0, 0, 0]            # OK, MISMATCH, BOOK_ERROR, DECODE_ERROR
        self._checkpoints: list[tuple[bytes, str | None] | None] = []
        book = self._new_book()
        ts: str | None = None
        for i, ev in enumerate(events):
            if i % every == 0:
                self._checkpoints.append((render_book(book, ts), ts) if i else None)
            code, t = apply_event(book, ev, precisions)
            self.counts[code] += 1
            ts = t or ts

    def _new_book(self) -> Book:
        pp, qp = self.precisions[self.symbol]
        return Book(self.symbol, self.depth, pp, qp)

    def snapshot_frame(self, n: int) -> bytes | None:
        if n <= 0:
            return None
        n = min(n, len(self.events))
        c = n // self.every
        cp = self._checkpoints[c] if c < len(self._checkpoints) else None
        if c and cp is not None and n == c * self.every:
            return cp[0]
        book = self._new_book()
        ts: str | None = None
        start = 0
        if c and cp is not None:
            (u,) = decode_book(cp[0], self.precisions)
            try:
                book.apply(True, u.bids, u.asks)
            except BookError:      # a crossed recorded book: kept as recorded
                pass
            ts = cp[1]
            start = c * self.every
        for ev in self.events[start:n]:
            ts = apply_event(book, ev, self.precisions)[1] or ts
        return render_book(book, ts)


class RecordingSource(Source):
    """Serves a recording (our format or a DepthCharge capture), see recording.py.

    Only the data channels (book, trade, ohlc) become events; the recording's own
    status, heartbeat and ack frames are not replayed (the server makes its own), and
    its first instrument snapshot, if any, is served verbatim on the instrument channel.
    Event times count from the first data frame, so playback starts at once.

    Precisions: the flags (`price_precision` and `qty_precision`, applied to every
    symbol) win; else the header's `precisions`; else the recording's own instrument
    frames. A symbol left without precisions is a `SourceError` naming the flags.
    """

    def __init__(self, recording: Recording, *, price_precision: int | None = None,
                 qty_precision: int | None = None, depth: int | None = None) -> None:
        self.recording = recording
        rec_depth = recording.depth
        if depth is not None and rec_depth is not None and depth != rec_depth:
            raise SourceError(f"{recording.path}: recorded at depth {rec_depth}; it cannot be "
                              f"served at depth {depth} (drop --depth)")
        self.depth = depth or rec_depth or 0
        if self.depth not in BOOK_DEPTHS:
            raise SourceError(f"{recording.path}: the header has no book depth; pass --depth "
                              f"(one of {', '.join(map(str, BOOK_DEPTHS))})")
        self._instrument: bytes | None = None
        self.empty_frames = 0  # trade/ohlc frames with empty data, skipped
        instrument_prec: dict[str, tuple[int, int]] = {}
        events: list[SourceEvent] = []
        seen: list[str] = list(recording.symbols)
        t0: int | None = None
        last = 0
        for i, rf in enumerate(recording.frames):
            channel = rf.channel
            if channel == "instrument":
                if self._instrument is None and _TYPE_SNAPSHOT in rf.frame:
                    self._instrument = rf.frame
                instrument_prec.update(_instrument_precisions(rf.frame))
                continue
            if channel not in DATA_CHANNELS:
                continue
            if t0 is None:
                t0 = rf.rx_ns
            t = max(rf.rx_ns - t0, last)  # clamp a clock that stepped back
            last = t
            ev = make_event(t, channel, rf.frame)
            if not ev.symbol:
                if channel != "book" and b'"data":[]' in rf.frame:
                    # An empty trade/ohlc snapshot (a quiet pair) carries nothing to serve.
                    self.empty_frames += 1
                    continue
                raise SourceError(f"{recording.file_of(i)}:{rf.line}: {channel} frame "
                                  "without a symbol")
            if ev.symbol not in seen:
                seen.append(ev.symbol)
            events.append(ev)
        self.symbols = tuple(seen)
        self.events_list = events
        self.precisions = _resolve_precisions(recording, self.symbols, instrument_prec,
                                              price_precision, qty_precision)
        per_symbol: dict[str, list[SourceEvent]] = {sym: [] for sym in self.symbols}
        for ev in events:
            if ev.channel == "book":
                per_symbol[ev.symbol].append(ev)
        for sym, evs in per_symbol.items():   # wrong precisions: say so, do not serve
            if evs:
                try:
                    decode_book(evs[0].frame, self.precisions)
                except WireError as e:
                    pp, qp = self.precisions[sym]
                    raise SourceError(f"{recording.path}: the first {sym} book frame does not "
                                      f"decode at precisions {pp}/{qp} ({e}); check "
                                      "--price-precision/--qty-precision") from None
        every = max(256, 4 * self.depth)
        self.books = {sym: BookIndex(sym, self.depth, self.precisions, evs, every)
                      for sym, evs in per_symbol.items()}

    indexed = True

    def snapshot_frame(self, symbol: str, n: int) -> bytes | None:
        return self.books[symbol].snapshot_frame(n)

    def stats(self) -> dict[str, int]:
        totals = [sum(b.counts[i] for b in self.books.values()) for i in range(4)]
        return {"source_book_frames": sum(totals),
                "source_checksum_mismatches": totals[MISMATCH],
                "source_book_errors": totals[BOOK_ERROR],
                "source_decode_errors": totals[DECODE_ERROR]}

    @classmethod
    def from_path(cls, path: str | Path | Sequence[str | Path], *,
                  price_precision: int | None = None, qty_precision: int | None = None,
                  depth: int | None = None) -> RecordingSource:
        """Read a recording file (or, given a list, the rotated parts of one recording,
        in order: `read_recordings`) and wrap it. Raises RecordingError or SourceError."""
        rec = (read_recording(path) if isinstance(path, str | Path)
               else read_recordings(path))
        return cls(rec, price_precision=price_precision, qty_precision=qty_precision,
                   depth=depth)

    def events(self) -> Iterator[SourceEvent]:
        return iter(self.events_list)

    def instrument_frame(self) -> bytes | None:
        return self._instrument

    def describe(self) -> str:
        r = self.recording
        books = sum(1 for e in self.events_list if e.channel == "book")
        span = self.events_list[-1].t_ns / 1e9 if self.events_list else 0.0
        st = self.stats()
        bad = (st["source_checksum_mismatches"] + st["source_book_errors"]
               + st["source_decode_errors"])
        verdict = ("every checksum verifies" if not bad else
                   f"{bad} book frames do NOT verify (checksum {st['source_checksum_mismatches']}"
                   f", book {st['source_book_errors']}, decode {st['source_decode_errors']})")
        parts = f" and {len(r.parts) - 1} more part(s)" if len(r.parts) > 1 else ""
        alone = (f"; it is a rotated part that continues {r.continues}: its updates before "
                 "a snapshot have no book (give the parts from the first, in order)"
                 if r.continues and len(r.parts) == 1 else "")
        return (f"recording {r.path}{parts}: {len(self.symbols)} symbol(s) "
                f"{', '.join(self.symbols)} at depth {self.depth}, {len(self.events_list)} data "
                f"frames ({books} book, {verdict}) over {span:.1f} s; skipped "
                f"{r.skipped_raw} raw, {r.skipped_tx} client-sent{alone}")


def _instrument_precisions(frame: bytes) -> dict[str, tuple[int, int]]:
    try:
        msg = decode_message(frame)
    except WireError:
        return {}
    if not isinstance(msg, InstrumentMessage):
        return {}
    return {p.symbol: (p.price_precision, p.qty_precision) for p in msg.pairs}


def _resolve_precisions(recording: Recording, symbols: Sequence[str],
                        instrument: dict[str, tuple[int, int]],
                        price_precision: int | None, qty_precision: int | None
                        ) -> dict[str, tuple[int, int]]:
    if (price_precision is None) != (qty_precision is None):
        raise SourceError("pass both --price-precision and --qty-precision, or neither")
    out: dict[str, tuple[int, int]] = {}
    for sym in symbols:
        if price_precision is not None and qty_precision is not None:
            out[sym] = (price_precision, qty_precision)
        elif sym in recording.precisions:
            out[sym] = recording.precisions[sym]
        elif sym in instrument:
            out[sym] = instrument[sym]
        else:
            raise SourceError(
                f"{recording.path}: no precisions known for {sym} (the header has none and "
                "the recording has no instrument frame): pass --price-precision and "
                "--qty-precision")
    for sym, (pp, qp) in out.items():
        if not (0 <= pp <= 18 and 0 <= qp <= 18):
            raise SourceError(f"precisions for {sym} out of range: {pp}/{qp} (0-18)")
    return out

