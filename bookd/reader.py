"""Reader API for co-located strategy processes: bookd's books straight from shared memory.

    from bookd.reader import BookReader

    with BookReader.attach("BTC/USD", namespace="krakenfeed") as book:
        snap = book.snapshot()              # a consistent copy, taken under the seqlock
        if snap.state is BookState.VALID:
            bid_px, bid_qty = snap.best_bid  # exact Decimals
        ...

Theory of operation
-------------------
bookd (the only writer) keeps one segment per pair and a directory segment with its pid
and a heartbeat (docs/shm-layout.md). A `BookReader` maps both **read-only** (it can
neither modify nor unlink them, and CPython's resource tracker never hears of them) and
offers two ways in:

* `snapshot()` copies the payload under the seqlock (retrying while the writer is in
  the middle of a write) and returns a `BookSnapshot`: numpy uint64 arrays of
  `[price_ticks, qty_ticks]` rows, best first, with exact Decimal helpers. A copy
  costs a few microseconds and is never torn.
* `view()` is a context manager yielding a `BookView`: numpy arrays that point into
  the shared memory itself (zero copy). Data read through a view is only meaningful if
  the seqlock says nothing was written meanwhile: use `view.consistent(fn)` (calls
  `fn(view)` until it ran without a concurrent write) or `token = view.begin()` ...
  `view.validate(token)`. A view is invalid after its `with` block exits and after the
  reader moved to a new generation of the book (`ViewExpired` is raised on use). Arrays
  you extracted from it stay memory-safe after that (they keep the mapping alive) but
  show whatever the segment holds, validated by nothing.

State. `state` (and `BookSnapshot.state`) is the segment's state with the stale rule
applied: HALTED wins; otherwise STALE when the directory heartbeat is older than 1 s,
its pid is 0 (bookd closed) or dead (checked once the heartbeat is a few periods late,
so a `kill -9` shows within ~0.3 s); otherwise what bookd wrote (empty, valid,
resyncing, stale). `segment_state` is what bookd wrote, unfiltered.

Restarts. When bookd stops it writes STALE or HALTED and unlinks the names; an attached
reader keeps its mapping and reports that final state. While its writer is gone (closed,
dead or silent) the reader looks, at most every 50 ms and from any call, for a directory
of a new generation listing its pair, and moves to it transparently: the next snapshot
shows the new generation. `attach()` itself waits (polling) until bookd has created the
pair's segment; a segment left by a crashed bookd is attached and reported STALE.

Errors: `AttachTimeout` (a TimeoutError), `LayoutError` (a segment of another ABI
version), `ViewExpired`, `ReaderClosed`, and `SeqlockBusy` only when bookd died in the
middle of a write (from `read_payload()` and views; `snapshot()` returns STALE then).

A reader is not thread-safe; use one per thread.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from decimal import Context, Decimal
from types import TracebackType
from typing import TypeVar

import msgspec
import numpy as np

from bookd.layout import (
    D_HEARTBEAT_NS,
    D_PID,
    LAYOUT_VERSION,
    P_CHECKSUM,
    P_EXCHANGE_TS,
    P_N_ASKS,
    P_N_BIDS,
    P_PAYLOAD,
    P_PRICE_PRECISION,
    P_QTY_PRECISION,
    P_RECV_NS,
    P_SEQ,
    P_STATE,
    P_UPDATES,
    PAIR_HEADER_SIZE,
    PAIR_MAGIC,
    PAIR_STATIC,
    PAYLOAD_HEAD,
    AttachTimeout,
    BookState,
    LayoutError,
    SeqlockBusy,
    ShmError,
    ViewExpired,
    decode_name,
    directory_name,
    effective_state,
    late_after_ns,
    pair_geometry,
    pair_segment_name,
    writer_alive,
)
from bookd.seqlock import SeqlockReader
from bookd.shm import DirectoryInfo, ReadOnlyMapping, parse_directory, pid_alive, read_directory

__all__ = [
    "AttachTimeout", "BookReader", "BookSnapshot", "BookState", "BookView",
    "DirectoryInfo", "LayoutError", "ReaderClosed", "ShmError", "ViewExpired",
    "read_directory", "ticks_to_decimal",
]

T = TypeVar("T")
PROBE_INTERVAL_NS = 50_000_000   # how often a non-live reader looks for a new generation
PID_CHECK_INTERVAL_NS = 50_000_000
SPIN_TRIES = 100                 # seqlock attempts before yielding the CPU to the writer
ATTACH_POLL_S = 0.02
_EXACT = Context(prec=60)        # u64 has at most 20 digits: scaleb is exact
_EMPTY = np.zeros((0, 2), dtype=np.uint64)
_EMPTY.flags.writeable = False
_STATES = tuple(BookState)
_U64 = np.dtype(np.uint64)
_PID = D_PID // 4
_HB = D_HEARTBEAT_NS // 8
_BIDS_AT = PAIR_HEADER_SIZE - P_PAYLOAD  # offset of bid_prices in a payload copy


class ReaderClosed(ShmError):
    """The BookReader was closed."""


def ticks_to_decimal(ticks: int, precision: int) -> Decimal:
    """Exact decimal value of `ticks` at `precision` decimals (never rounds)."""
    return Decimal(int(ticks)).scaleb(-precision, _EXACT)


class BookSnapshot(msgspec.Struct, frozen=True, gc=False):
    """A consistent copy of one pair's book, independent of shared memory.

    `bids` and `asks` are read-only uint64 arrays of shape (n, 2), rows of
    [price_ticks, qty_ticks], best first (bids descending, asks ascending); they are
    views of one private copy (use `np.ascontiguousarray` if you need C order).
    """

    pair: str
    state: BookState          # with the stale rule applied (see module docstring)
    segment_state: BookState  # as bookd wrote it
    generation: int
    seq: int                  # seqlock counter value the copy belongs to
    depth: int
    price_precision: int
    qty_precision: int
    bids: np.ndarray
    asks: np.ndarray
    checksum: int
    exchange_ts_ns: int       # unix ns, 0 if unknown
    recv_ns: int              # unix ns, 0 before the first update
    age_ns: int | None        # now - recv_ns, None before the first update
    updates: int
    mismatches: int
    resyncs: int

    def bids_decimal(self) -> list[tuple[Decimal, Decimal]]:
        pp, qp = self.price_precision, self.qty_precision
        return [(ticks_to_decimal(p, pp), ticks_to_decimal(q, qp)) for p, q in self.bids.tolist()]

    def asks_decimal(self) -> list[tuple[Decimal, Decimal]]:
        pp, qp = self.price_precision, self.qty_precision
        return [(ticks_to_decimal(p, pp), ticks_to_decimal(q, qp)) for p, q in self.asks.tolist()]

    @property
    def best_bid(self) -> tuple[Decimal, Decimal] | None:
        """(price, qty) of the best bid, exact, or None if there is no bid."""
        if not len(self.bids):
            return None
        p, q = self.bids[0].tolist()
        return ticks_to_decimal(p, self.price_precision), ticks_to_decimal(q, self.qty_precision)

    @property
    def best_ask(self) -> tuple[Decimal, Decimal] | None:
        if not len(self.asks):
            return None
        p, q = self.asks[0].tolist()
        return ticks_to_decimal(p, self.price_precision), ticks_to_decimal(q, self.qty_precision)

    @property
    def mid(self) -> Decimal | None:
        """(best bid + best ask) / 2, exact (one more decimal than the price)."""
        if not len(self.bids) or not len(self.asks):
            return None
        total = int(self.bids[0, 0]) + int(self.asks[0, 0])
        return ticks_to_decimal(total * 5, self.price_precision + 1)

    @property
    def spread(self) -> Decimal | None:
        if not len(self.bids) or not len(self.asks):
            return None
        return ticks_to_decimal(int(self.asks[0, 0]) - int(self.bids[0, 0]), self.price_precision)

    @property
    def usable(self) -> bool:
        """True if the book is VALID: checksum verified and a live writer."""
        return self.state is BookState.VALID


class _Attached:
    """The mappings of one generation of one pair (directory + pair segment)."""

    __slots__ = ("dir", "seg", "pair", "generation", "depth", "geo", "hb_ms", "late_ns",
                 "lock", "dir_u32", "dir_u64", "u32", "u64", "arrays", "views", "retired")

    def __init__(self, pair: str, d: ReadOnlyMapping, seg: ReadOnlyMapping, info: DirectoryInfo,
                 depth: int) -> None:
        self.dir, self.seg, self.pair = d, seg, pair
        self.generation, self.hb_ms = info.generation, info.heartbeat_ms
        self.late_ns = late_after_ns(info.heartbeat_ms)
        self.depth, self.geo = depth, pair_geometry(depth)
        self.lock = SeqlockReader(seg.buf, P_SEQ, P_PAYLOAD, self.geo.size)
        self.dir_u32, self.dir_u64 = d.cast("I"), d.cast("Q")
        self.u32, self.u64 = seg.cast("I"), seg.cast("Q")
        self.arrays: tuple[np.ndarray, ...] | None = None
        self.views = 0
        self.retired = False

    def level_arrays(self) -> tuple[np.ndarray, ...]:
        if self.arrays is None:
            g, buf, d = self.geo, self.seg.buf, self.depth
            self.arrays = tuple(np.frombuffer(buf, dtype=np.uint64, count=d, offset=off)
                                for off in (g.bid_prices, g.bid_qtys, g.ask_prices, g.ask_qtys))
        return self.arrays

    def close(self) -> None:
        self.arrays = None
        self.lock.release()
        self.seg.close()
        self.dir.close()


def _open(pair: str, namespace: str) -> tuple[_Attached | None, str]:
    """One attempt to map a live-or-finished book; (None, why) if not there yet."""
    dname = directory_name(namespace)
    d = ReadOnlyMapping.open(dname)
    if d is None:
        return None, f"no directory segment /dev/shm/{dname} (is bookd running?)"
    seg: ReadOnlyMapping | None = None
    try:
        info = parse_directory(namespace, d)
        if info is None:
            return None, f"bookd is still creating /dev/shm/{dname}"
        if pair not in info.pairs:
            return None, (f"bookd (pid {info.pid}) serves {', '.join(info.pairs)} but not "
                          f"{pair}")
        sname = pair_segment_name(namespace, pair)
        seg = ReadOnlyMapping.open(sname)
        if seg is None or seg.size < PAIR_HEADER_SIZE:
            return None, f"no segment /dev/shm/{sname} yet"
        magic, version, header_size, depth, _, generation, raw = PAIR_STATIC.unpack_from(seg.buf)
        if magic == 0:
            return None, f"bookd is still creating /dev/shm/{sname}"
        if magic != PAIR_MAGIC or version != LAYOUT_VERSION or header_size != PAIR_HEADER_SIZE:
            raise LayoutError(f"/dev/shm/{sname}: magic {magic:#x}, layout version {version}, "
                              f"header {header_size}; this reader understands version "
                              f"{LAYOUT_VERSION}")
        if generation != info.generation:
            return None, f"/dev/shm/{sname} is from another generation (bookd restarting)"
        if decode_name(raw) != pair or seg.size < pair_geometry(depth).size:
            raise LayoutError(f"/dev/shm/{sname}: pair {decode_name(raw)!r}, depth {depth}, "
                              f"{seg.size} bytes: inconsistent")
        att = _Attached(pair, d, seg, info, depth)
        d = seg = None  # owned by att now
        return att, ""
    finally:
        if seg is not None:
            seg.close()
        if d is not None:
            d.close()


class BookReader:
    """Read one pair's book from bookd's shared memory (see the module docstring)."""

    def __init__(self, pair: str, namespace: str, attached: _Attached) -> None:
        """Use `BookReader.attach()`."""
        self.pair, self.namespace = pair, namespace
        self._att: _Attached | None = attached
        self._next_probe = 0
        self._pid_checked_ns = 0
        self._pid_ok = True
        self.reattaches = 0

    @classmethod
    def attach(cls, pair: str, timeout: float = 5.0, namespace: str = "krakenfeed") -> BookReader:
        """Attach to `pair`'s book, waiting up to `timeout` s for bookd to create it.

        Raises `AttachTimeout` (a TimeoutError) naming the pair, the namespace and what
        was missing; `LayoutError` at once for a segment of another layout version.
        """
        deadline = time.monotonic() + timeout
        while True:
            att, why = _open(pair, namespace)
            if att is not None:
                return cls(pair, namespace, att)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AttachTimeout(pair, namespace, timeout, why)
            time.sleep(min(ATTACH_POLL_S, left))

    # -- liveness and re-attach -------------------------------------------------------
    def _live(self, att: _Attached) -> bool:
        now = time.monotonic_ns()
        pid = att.dir_u32[D_PID // 4]
        ok = writer_alive(pid, att.dir_u64[D_HEARTBEAT_NS // 8], now, att.hb_ms)
        if ok is None:  # heartbeat late: is the pid still there?
            if now - self._pid_checked_ns > PID_CHECK_INTERVAL_NS:
                self._pid_ok = pid_alive(pid)
                self._pid_checked_ns = now
            ok = self._pid_ok
        return ok

    def _current(self) -> tuple[_Attached, bool]:
        att = self._att
        if att is None:
            raise ReaderClosed(f"BookReader for {self.pair} is closed")
        # Fast path, the common case: a pid and a heartbeat that is not late, which is
        # exactly when writer_alive() returns True.
        if att.dir_u32[_PID] and time.monotonic_ns() - att.dir_u64[_HB] <= att.late_ns:
            return att, True
        ok = self._live(att)
        if not ok:  # only a dead or closed writer can have been replaced
            now = time.monotonic_ns()
            if now >= self._next_probe:
                self._next_probe = now + PROBE_INTERVAL_NS
                if self._probe(att):
                    att = self._att
                    ok = self._live(att)
        return att, ok

    def _probe(self, old: _Attached) -> bool:
        """Move to a new generation of the book if bookd has created one."""
        try:
            att, _ = _open(self.pair, self.namespace)
        except (LayoutError, OSError):
            return False
        if att is None:
            return False
        if att.generation == old.generation:
            att.close()
            return False
        self._att = att
        self._pid_checked_ns = 0
        self.reattaches += 1
        old.retired = True
        if old.views == 0:
            old.close()
        return True

    # -- copies -----------------------------------------------------------------------
    def _payload(self, att: _Attached) -> tuple[int, bytes] | None:
        """A validated copy; None if the writer died in the middle of a write."""
        lock = att.lock
        try:
            return lock.read_versioned(SPIN_TRIES)
        except SeqlockBusy:
            pass
        rounds = 0
        while True:  # the writer is descheduled mid-write (or dead): stop spinning
            os.sched_yield()
            try:
                return lock.read_versioned(SPIN_TRIES)
            except SeqlockBusy:
                rounds += 1
            if rounds % 32 == 0:
                if not self._live(att):
                    return None
                time.sleep(0.0001)

    def read_payload(self) -> bytes:
        """The raw seqlock-validated payload (bytes 80..end of the segment, see the docs).

        For tools and tests of other-language readers; raises `SeqlockBusy` if bookd
        died in the middle of a write.
        """
        att, _ = self._current()
        got = self._payload(att)
        if got is None:
            raise SeqlockBusy(f"{self.pair}: bookd died in the middle of a write")
        return got[1]

    def snapshot(self) -> BookSnapshot:
        """A consistent copy of the book (never torn). See `BookSnapshot`.

        If bookd died in the middle of a write, the book cannot be read consistently any
        more: the snapshot then has state STALE, no levels and zero counters.
        """
        att, ok = self._current()
        got = self._payload(att)
        d = att.depth
        if got is None:
            return BookSnapshot(self.pair, BookState.STALE, BookState.STALE, att.generation,
                                att.lock.seq, d, 0, 0, _EMPTY, _EMPTY, 0, 0, 0, None, 0, 0, 0)
        seq, data = got
        (pp, qp, mism, resy, raw_state, nb, na, checksum, ets, recv, updates
         ) = PAYLOAD_HEAD.unpack_from(data)
        # Each side as an (n, 2) [price, qty] view of the immutable copy: prices and
        # quantities are 8*depth bytes apart (read-only, no second copy).
        strides = (8, 8 * d)
        bids = np.ndarray((min(nb, d), 2), _U64, data, _BIDS_AT, strides)
        asks = np.ndarray((min(na, d), 2), _U64, data, _BIDS_AT + 16 * d, strides)
        seg_state = _STATES[raw_state] if raw_state < len(_STATES) else BookState.STALE
        return BookSnapshot(self.pair, effective_state(raw_state, ok), seg_state,
                            att.generation, seq, d, pp, qp, bids, asks, checksum, ets, recv,
                            time.time_ns() - recv if recv else None, updates, mism, resy)

    # -- zero copy --------------------------------------------------------------------
    def view(self) -> BookView:
        """A context manager yielding zero-copy views into the current generation."""
        att, _ = self._current()
        return BookView(self, att)

    # -- properties -------------------------------------------------------------------
    @property
    def state(self) -> BookState:
        """The book's state with the stale rule applied (one aligned load, no copy)."""
        att, ok = self._current()
        return effective_state(att.u32[P_STATE // 4], ok)

    @property
    def age_ns(self) -> int | None:
        """Nanoseconds since bookd received the last update of this book (None: none yet)."""
        att, _ = self._current()
        recv = att.u64[P_RECV_NS // 8]
        return time.time_ns() - recv if recv else None

    @property
    def generation(self) -> int:
        return self._current()[0].generation

    @property
    def depth(self) -> int:
        return self._current()[0].depth

    @property
    def retries(self) -> int:
        """Seqlock read attempts that raced a write (current generation)."""
        att = self._att
        return att.lock.retries if att is not None else 0

    def close(self) -> None:
        att, self._att = self._att, None
        if att is not None:
            att.retired = True
            if att.views == 0:
                att.close()

    def __enter__(self) -> BookReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        att = self._att
        where = f"generation {att.generation}" if att else "closed"
        return f"BookReader({self.pair!r}, namespace={self.namespace!r}, {where})"


class BookView:
    """Zero-copy numpy views into one generation of a book, valid inside `with`.

    Arrays (`bid_prices`, `bid_qtys`, `ask_prices`, `ask_qtys`) are read-only uint64 of
    length `depth`; only the first `n_bids` / `n_asks` entries are levels. They and the
    header properties (`n_bids`, `checksum`, `exchange_ts_ns`, `recv_ns`, ...) read the
    shared memory itself, so read them under the seqlock::

        with reader.view() as v:
            bid, ask = v.consistent(lambda v: (int(v.bid_prices[0]), int(v.ask_prices[0])))

    or by hand: `t = v.begin()`, read, then `v.validate(t)` (retry if False).
    """

    def __init__(self, reader: BookReader, att: _Attached) -> None:
        self._reader, self._att = reader, att
        self._open = False
        self.pair, self.generation, self.depth = att.pair, att.generation, att.depth

    def __enter__(self) -> BookView:
        self._att.views += 1
        self._open = True
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._open:
            self._open = False
            att = self._att
            att.views -= 1
            if att.retired and att.views == 0:
                att.close()

    def _live_att(self) -> _Attached:
        att = self._att
        if not self._open:
            raise ViewExpired(f"view of {self.pair} used outside its `with` block")
        if att.retired:
            raise ViewExpired(f"view of {self.pair} generation {self.generation}: the book "
                              f"was replaced (reader closed or bookd restarted)")
        return att

    def _array(self, k: int) -> np.ndarray:
        return self._live_att().level_arrays()[k]

    bid_prices = property(lambda self: self._array(0), doc="uint64[depth], best first")
    bid_qtys = property(lambda self: self._array(1), doc="uint64[depth]")
    ask_prices = property(lambda self: self._array(2), doc="uint64[depth], best first")
    ask_qtys = property(lambda self: self._array(3), doc="uint64[depth]")

    # Header words, read in place (one aligned load each; validate like the arrays).
    def _u32(self, offset: int) -> int:
        return self._live_att().u32[offset // 4]

    def _u64(self, offset: int) -> int:
        return self._live_att().u64[offset // 8]

    @property
    def n_bids(self) -> int:
        return min(self._u32(P_N_BIDS), self.depth)

    @property
    def n_asks(self) -> int:
        return min(self._u32(P_N_ASKS), self.depth)

    price_precision = property(lambda self: self._u32(P_PRICE_PRECISION))
    qty_precision = property(lambda self: self._u32(P_QTY_PRECISION))
    checksum = property(lambda self: self._u32(P_CHECKSUM))
    exchange_ts_ns = property(lambda self: self._u64(P_EXCHANGE_TS))
    recv_ns = property(lambda self: self._u64(P_RECV_NS))
    updates = property(lambda self: self._u64(P_UPDATES))

    @property
    def state(self) -> BookState:
        """Effective state of this generation (the stale rule applied)."""
        att = self._live_att()
        return effective_state(att.u32[P_STATE // 4], self._reader._live(att))

    def begin(self) -> int:
        """Wait for an even seqlock counter and return it (the token for `validate`).

        Spins briefly, then yields the CPU (the writer may be descheduled mid-write).
        Raises `SeqlockBusy` only if bookd died in the middle of a write.
        """
        att = self._live_att()
        lock = att.lock
        rounds = 0
        while True:
            for _ in range(SPIN_TRIES):
                token = lock.begin()
                if token is not None:
                    return token
            os.sched_yield()
            rounds += 1
            if rounds % 32 == 0 and not self._reader._live(att):
                raise SeqlockBusy(f"{self.pair}: bookd died in the middle of a write")

    def validate(self, token: int) -> bool:
        """True if nothing was written since `begin()` returned `token`."""
        return self._live_att().lock.validate(token)

    def consistent(self, fn: Callable[[BookView], T], tries: int = 100_000) -> T:
        """Call `fn(self)` until it ran while nothing was written; return its result.

        `fn` must only read, and should be short: a run that overlaps a write is thrown
        away and repeated (at most `tries` times, then `SeqlockBusy`). An exception from
        a run that overlapped a write (which may have seen garbage, e.g. a count beyond
        the levels) is swallowed and retried.
        """
        for _ in range(tries):
            token = self.begin()
            try:
                result = fn(self)
            except (IndexError, ValueError, ArithmeticError):
                if self.validate(token):
                    raise
                continue
            if self.validate(token):
                return result
        raise SeqlockBusy(f"{self.pair}: no consistent read in {tries} attempts")
