"""One client connection of the replay server, as pure logic (no sockets, no clock).

Theory of operation
-------------------
The shell (replay/server.py) owns the socket and the timers; a `Session` owns what the
connection means: its subscriptions, its own stream of the source, its books, its rate
limit. Inputs are values (request bytes, `now` in monotonic ns, `wall` in Unix ns);
outputs are bytes to send:

* `connect(wall)` -> the status frame that opens every connection.
* `receive(payload, now, wall)` -> `Reply`: text frames to send now, and possibly a
  request to run later (`slow-acks`). The token bucket (rate_burst, then rate_per_s)
  is charged per request; an excess request gets `{"Error":"Exceeded msg rate"}` and
  is not executed. During `stall-all` requests are held and answered when it ends.
* `execute(request, wall)` -> the acks of a subscribe/unsubscribe (or a pong).
* `pump(now, wall)` -> `Pump`: WebSocket frames (already framed, for one batched
  write), when to pump again, and whether to drop the connection now.

The stream starts at the first successful data subscription (book, trade or ohlc):
events are due at `start + t_ns / speed`, all at once at `--speed max` (in batches of
`batch` frames so the loop stays responsive). Every event advances the books and the
recent trade/candle memory whether or not the client subscribed to it; only
subscribed (channel, symbol[, interval]) frames are sent, verbatim.

Books: a source with fixed streams (a recording: `source.indexed`) keeps its books
once for every connection (`source.BookIndex`); the session only counts each symbol's
book events and asks the source for the snapshot at that count. Otherwise the session
keeps a `bookd.book.Book` per symbol, lazily but exactly: the frames since the last
snapshot wait in `pending` and are applied when a snapshot must be generated, or when
more than `pending_cap` accumulate; a snapshot in the stream resets the list. Either
way no book work is done per frame at `--speed max`, and a (re)subscribe queues a
generated snapshot, sent at the next pump from the book at that point of the stream
(after the ack, before any later frame), with the book's checksum and the timestamp of
the last change. A symbol whose stream has not reached its first snapshot yet gets the
stream's own snapshot instead.

At the end of the stream the session stops sending data (heartbeats are the shell's);
with `loop` it starts a fresh stream at once: the books are reset, and the stream's own
first snapshots go to the subscribed clients, so books stay consistent.
"""

from __future__ import annotations

import math
import secrets
from collections import deque

import msgspec
from msgspec import Struct

from bookd.book import Book

from . import frames as F
from .faults import CORRUPT, SEND, SILENCE, SKIP, FaultState
from .source import (
    BOOK_ERROR,
    DECODE_ERROR,
    MISMATCH,
    Source,
    SourceEvent,
    apply_event,
    render_book,
)

__all__ = ["Session", "SessionConfig", "Counters", "Reply", "Pump", "Request", "OHLC_INTERVALS"]

OHLC_INTERVALS = (1, 5, 15, 30, 60, 240, 1440, 10080, 21600)
_OHLC_WARNING = "timestamp is deprecated, use interval_begin"
_INSTRUMENT_WARNING = "tick_size is deprecated, use price_increment"
_REFUSED = "EService:Unavailable"


class SessionConfig(Struct, frozen=True):
    speed: float = 1.0          # 0 = as fast as possible ("max")
    loop: bool = False
    rate_burst: int = 10
    rate_per_s: float = 20.0
    batch: int = 2048           # frames per pump at --speed max
    pending_cap: int = 4096     # book frames kept before they are applied


class Counters:
    """Server-wide counters, shared by every session (one event loop, no locks)."""

    FIELDS = ("connections_total", "data_frames", "data_bytes", "snapshots_generated",
              "requests", "acks", "refusals", "rate_limited", "pings", "heartbeats",
              "bad_requests", "loops", "source_checksum_mismatches", "source_book_errors",
              "source_decode_errors", "drops")

    def __init__(self) -> None:
        for f in self.FIELDS:
            setattr(self, f, 0)

    def as_dict(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in self.FIELDS}


class Reply(Struct):
    frames: list[bytes]
    deferred: Request | None = None   # run `execute` after faults.slow_ack_ms


class Pump(Struct):
    parts: list[bytes]                # WebSocket frames (or header, payload pairs), in order
    next_at: float                    # monotonic ns; 0 = at once; math.inf = on wake
    drop: bool = False


class _Params(Struct):
    channel: str | None = None
    symbol: list[str] | None = None
    depth: int | None = None
    snapshot: bool | None = None
    interval: int | None = None


class Request(Struct):
    method: str | None = None
    params: _Params | None = None
    req_id: int | None = None
    time_in: str = ""


_req_dec = msgspec.json.Decoder(Request)


class _BookState:
    __slots__ = ("book", "pending", "ready", "timestamp", "n")

    def __init__(self, symbol: str, depth: int, pp: int, qp: int) -> None:
        self.book = Book(symbol, depth, pp, qp)
        self.pending: list[SourceEvent] = []
        self.ready = False          # the stream has reached this symbol's first snapshot
        self.timestamp: str | None = None
        self.n = 0                  # book events of this symbol in this pass (indexed)


class Session:
    """See the module docstring."""

    def __init__(self, source: Source, faults: FaultState, counters: Counters,
                 config: SessionConfig = SessionConfig(),  # noqa: B008 - frozen Struct
                 connection_id: int | None = None) -> None:
        self.source = source
        self.faults = faults
        self.counters = counters
        self.cfg = config
        self.connection_id = connection_id or (2**53 + 1 + secrets.randbelow(2**64 - 2**53 - 1))
        self.symbols = frozenset(source.symbols)
        self.book_subs: set[str] = set()
        self.trade_subs: set[str] = set()
        self.ohlc_subs: set[tuple[str, int]] = set()
        self.instrument_sub = False
        self.books = {s: _BookState(s, source.depth, *source.precisions[s])
                      for s in source.symbols}
        self._indexed = bool(getattr(source, "indexed", False))
        self._trades: dict[str, deque[bytes]] = {}
        self._candles: dict[tuple[str, int], deque[bytes]] = {}
        self._snap_pending: dict[tuple, None] = {}   # ordered set of ("book", s) etc.
        self._held: list[tuple[bytes, str]] = []      # requests held during stall-all
        self._tokens = float(config.rate_burst)
        self._tokens_at: int | None = None
        self.playing = False
        self._need_start = False
        self.ended = False
        self._it = None
        self._next: SourceEvent | None = None
        self._base = 0.0
        self._stall_start: int | None = None
        self.frames_sent = 0

    # -- connection ---------------------------------------------------------------------
    def connect(self) -> bytes:
        return F.status_frame(self.faults.system, self.connection_id)

    def status(self) -> bytes:
        return F.status_frame(self.faults.system, self.connection_id)

    # -- requests -----------------------------------------------------------------------
    def _take_token(self, now: int) -> bool:
        cfg = self.cfg
        if self._tokens_at is not None:
            self._tokens = min(float(cfg.rate_burst),
                               self._tokens + (now - self._tokens_at) * 1e-9 * cfg.rate_per_s)
        self._tokens_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def receive(self, payload: bytes, now: int, wall: int) -> Reply:
        """A text frame from the client."""
        if self.faults.all_stalled_until(now):
            self._held.append((payload, F.rfc3339(wall)))
            return Reply([])
        return self._receive(payload, now, wall, F.rfc3339(wall))

    def _receive(self, payload: bytes, now: int, wall: int, time_in: str) -> Reply:
        c = self.counters
        c.requests += 1
        if not self._take_token(now):
            c.rate_limited += 1
            return Reply([F.RATE_LIMITED])
        try:
            req = _req_dec.decode(payload)
        except msgspec.DecodeError:
            c.bad_requests += 1
            return Reply([F.error_ack("error", "Malformed request", time_in,
                                      F.rfc3339(wall), None)])
        req.time_in = time_in
        if req.method == "subscribe" and self.faults.take_rate_limit():
            c.rate_limited += 1
            return Reply([F.RATE_LIMITED])
        if req.method in ("subscribe", "unsubscribe") and self.faults.slow_ack_ms:
            return Reply([], req)
        return Reply(self.execute(req, wall))

    def execute(self, req: Request, wall: int) -> list[bytes]:
        """Run a request; returns the frames to send (acks first, then e.g. instrument)."""
        method = req.method
        if method == "ping":
            self.counters.pings += 1
            return [F.pong(req.req_id, req.time_in, F.rfc3339(wall))]
        if method not in ("subscribe", "unsubscribe"):
            self.counters.bad_requests += 1
            if method is None:
                return [F.error_ack("error", "Malformed request", req.time_in,
                                    F.rfc3339(wall), req.req_id)]
            return [F.error_ack(method, f"Method not found: {method}", req.time_in,
                                F.rfc3339(wall), req.req_id)]
        p = req.params or _Params()
        out: list[bytes] = []
        t_out = F.rfc3339(wall)

        def refuse(error: str, symbol: str | None = None) -> None:
            self.counters.refusals += 1
            out.append(F.error_ack(method, error, req.time_in, t_out, req.req_id, symbol))

        def accept(result: dict) -> None:
            self.counters.acks += 1
            out.append(F.ack(method, result, req.time_in, t_out, req.req_id))

        channel = p.channel
        sub = method == "subscribe"
        if channel == "instrument":
            if sub and self.faults.take_refusal("instrument", None):
                refuse(_REFUSED)
                return out
            snap = True if p.snapshot is None else p.snapshot
            self.instrument_sub = sub
            if sub:
                accept({"channel": "instrument", "snapshot": snap,
                        "warnings": [_INSTRUMENT_WARNING]})
                if snap:
                    out.append(self.source.instrument_frame()
                               or F.instrument_snapshot(self.source.symbols,
                                                        self.source.precisions))
            else:
                accept({"channel": "instrument"})
            return out
        if channel not in ("book", "trade", "ohlc"):
            refuse("Malformed request: channel is required" if channel is None
                   else f"Channel {channel} not supported")
            self.counters.bad_requests += 1
            return out
        if not p.symbol:
            refuse("Malformed request: symbol is required")
            self.counters.bad_requests += 1
            return out
        depth = interval = 0
        if channel == "book":
            depth = p.depth if p.depth is not None else (10 if sub else self.source.depth)
            if depth != self.source.depth:
                refuse("Subscription depth not supported")
                return out
        elif channel == "ohlc":
            interval = p.interval if p.interval is not None else 1
            if interval not in OHLC_INTERVALS:
                refuse("Subscription ohlc interval not supported")
                return out
        if sub and self.faults.take_refusal(channel, None):
            for sym in p.symbol:
                refuse(_REFUSED, sym)
            return out
        default_snap = channel != "trade"
        snap = default_snap if p.snapshot is None else p.snapshot
        for sym in p.symbol:
            if sym not in self.symbols:
                refuse(f"Currency pair not supported {sym}", sym)
                continue
            if sub and self.faults.take_refusal(channel, sym):
                refuse(_REFUSED, sym)
                continue
            key = ((channel, sym, interval) if channel == "ohlc" else (channel, sym))
            subs = (self.book_subs if channel == "book" else
                    self.trade_subs if channel == "trade" else self.ohlc_subs)
            member = (sym, interval) if channel == "ohlc" else sym
            if sub:
                if member in subs:
                    refuse("Already subscribed", sym)
                    continue
                subs.add(member)  # type: ignore[arg-type]
                if snap:
                    self._snap_pending[key] = None
                if not self.playing:
                    self.playing = True
                    self._need_start = True
            else:
                if member not in subs:
                    refuse("Subscription Not Found", sym)
                    continue
                subs.discard(member)  # type: ignore[arg-type]
                self._snap_pending.pop(key, None)
            result: dict = {"channel": channel}
            if channel == "book":
                result["depth"] = depth
            elif channel == "ohlc":
                result["interval"] = interval
            if sub:
                result["snapshot"] = snap
            result["symbol"] = sym
            if sub and channel == "ohlc":
                result["warnings"] = [_OHLC_WARNING]
            accept(result)
        return out

    # -- books --------------------------------------------------------------------------
    def _catch_up(self, st: _BookState) -> None:
        book = st.book
        prec = self.source.precisions
        c = self.counters
        for ev in st.pending:
            code, ts = apply_event(book, ev, prec)
            if code:
                if code == MISMATCH:
                    c.source_checksum_mismatches += 1
                elif code == BOOK_ERROR:
                    c.source_book_errors += 1
                elif code == DECODE_ERROR:
                    c.source_decode_errors += 1
            if ts:
                st.timestamp = ts
        st.pending = []

    def current_snapshot(self, symbol: str) -> bytes | None:
        """A snapshot frame of `symbol`'s book at this point of the stream (None before
        the stream reached its first snapshot)."""
        st = self.books[symbol]
        if not st.ready:
            return None
        if self._indexed:
            return self.source.snapshot_frame(symbol, st.n)
        self._catch_up(st)
        return render_book(st.book, st.timestamp)

    def _snapshot_frame(self, key: tuple) -> bytes | None:
        channel, sym = key[0], key[1]
        if channel == "book":
            return self.current_snapshot(sym)  # None: the stream's own is still to come
        if channel == "trade":
            return F.items_snapshot("trade", self._trades.get(sym, ()))
        return F.ohlc_snapshot(self._candles.get((sym, key[2]), ()))

    # -- the stream ---------------------------------------------------------------------
    def _start(self, now: int) -> None:
        self._it = iter(self.source.events())
        self._next = None
        self._base = float(now)
        self._need_start = False

    def _reset_books(self) -> None:
        for st in self.books.values():
            st.book.clear()
            st.pending = []
            st.ready = False
            st.timestamp = None
            st.n = 0

    def _advance(self, now: int) -> SourceEvent | None:
        ev = next(self._it, None)  # type: ignore[call-overload]
        if ev is None and self.cfg.loop:
            self.counters.loops += 1
            self._reset_books()
            self._start(now)
            ev = next(self._it, None)  # type: ignore[call-overload]
        if ev is None:
            self.ended = True
        return ev

    def pump(self, now: int, wall: int, max_events: int = 0) -> Pump:
        """Everything due at `now`, as complete WebSocket frames, handling at most
        `max_events` stream events (default `batch`). See the module docstring."""
        fs = self.faults
        parts: list[bytes] = []
        if fs.stall_all_until or fs.stall_until:
            until = fs.stalled_until(now)
            if until:
                if self._stall_start is None:
                    self._stall_start = now
                return Pump(parts, until)
        if self._stall_start is not None:    # the timeline paused during the stall
            self._base += now - self._stall_start
            self._stall_start = None
        while self._held:                    # requests that arrived during stall-all
            payload, time_in = self._held.pop(0)
            reply = self._receive(payload, now, wall, time_in)
            frames = reply.frames
            if reply.deferred is not None:
                frames = self.execute(reply.deferred, wall)
            parts.extend(F.ws_frame(f) for f in frames)
        if not self.playing:
            return Pump(parts, math.inf)
        if self._need_start:
            self._start(now)
        next_at = math.inf
        drop = False
        c = self.counters
        if self._snap_pending:
            for key in list(self._snap_pending):
                if key[0] == "book" and fs.silence:
                    until = fs.silenced_until(key[1], now)
                    if until:
                        next_at = min(next_at, until)
                        continue
                frame = self._snapshot_frame(key)
                if frame is None:
                    continue
                del self._snap_pending[key]
                if key[0] == "book" and fs.data_active:
                    act = fs.book_action(key[1], now)
                    if act == SKIP or act == SILENCE:
                        continue
                    if act == CORRUPT:
                        frame = F.corrupt_checksum(frame)
                c.snapshots_generated += 1
                parts.append(F.ws_frame(frame))
                c.data_frames += 1
                c.data_bytes += len(frame)
                if fs.data_active and fs.data_sent():
                    return Pump(parts, 0, True)
        if self.ended:
            return Pump(parts, next_at)
        speed = self.cfg.speed
        budget = max_events or self.cfg.batch
        books = self.books
        book_subs = self.book_subs
        cap = self.cfg.pending_cap
        indexed = self._indexed
        base = self._base
        n = 0
        nbytes = 0
        ev = self._next
        while budget:
            if ev is None:
                ev = self._advance(now)
                if ev is None:
                    break
                base = self._base
            if speed:
                due = base + ev.t_ns / speed
                if due > now:
                    next_at = min(next_at, due)
                    break
            budget -= 1
            ch = ev.channel
            sym = ev.symbol
            if ch == "book":
                st = books.get(sym)
                if st is None:
                    ev = None
                    continue
                if indexed:
                    st.n += 1
                    if ev.snapshot:
                        st.ready = True
                elif ev.snapshot:
                    st.pending = [ev]
                    st.ready = True
                else:
                    pend = st.pending
                    pend.append(ev)
                    if len(pend) > cap:
                        self._catch_up(st)
                if sym not in book_subs:
                    ev = None
                    continue
                if fs.data_active:
                    act = fs.book_action(sym, now)
                    if act != SEND:
                        if ev.snapshot and act != SILENCE:  # it counts as delivered
                            self._snap_pending.pop(("book", sym), None)
                        if act == CORRUPT:
                            bad = F.corrupt_checksum(ev.frame)
                            parts.append(F.ws_frame(bad))
                            n += 1
                            nbytes += len(bad)
                            if fs.data_sent():
                                drop = True
                                ev = None
                                break
                        ev = None
                        continue
            elif ch == "trade":
                dq = self._trades.get(sym)
                if dq is None:
                    dq = self._trades[sym] = deque(maxlen=50)
                dq.append(ev.frame)
                if sym not in self.trade_subs:
                    ev = None
                    continue
            elif ch == "ohlc":
                k = (sym, ev.interval)
                dq = self._candles.get(k)
                if dq is None:
                    dq = self._candles[k] = deque(maxlen=100)
                dq.append(ev.frame)
                if k not in self.ohlc_subs:
                    ev = None
                    continue
            else:
                ev = None
                continue
            if ev.snapshot and self._snap_pending:
                self._snap_pending.pop((ch, sym, ev.interval) if ch == "ohlc" else (ch, sym), None)
            h = ev.ws_header
            frame = ev.frame
            if h is None:
                h = ev.ws_header = F.ws_header(len(frame))
            parts.append(h)
            parts.append(frame)
            n += 1
            nbytes += len(frame)
            ev = None
            if fs.data_active and fs.data_sent():
                drop = True
                break
        else:
            next_at = 0            # budget used up: more may be due at once
        self._next = ev
        c.data_frames += n
        c.data_bytes += nbytes
        self.frames_sent += n
        if drop:
            return Pump(parts, 0, True)
        if self.ended and not self._snap_pending:
            next_at = math.inf
        return Pump(parts, next_at)
