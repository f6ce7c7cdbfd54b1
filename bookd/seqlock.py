"""A single-writer seqlock over a writable buffer, and the pair-segment writer built on it.

Pure: no I/O, no clock. `SeqlockWriter`/`SeqlockReader` implement the protocol on any
buffer; `PairWriter` encodes one pair segment of bookd/layout.py through it (bookd's
`BookWriter` in bookd/shm.py is a thin shell that hands it shared-memory buffers).

Theory of operation
-------------------
One writer, any number of readers, no locks and no system calls. A 64-bit counter,
naturally aligned inside the buffer, guards a payload region:

    writer                                   reader
    ------                                   ------
    seq += 1        (now odd)                do {
    write the payload                            s1 = seq          (retry while odd)
    seq += 1        (even again)                 copy the payload
                                                 s2 = seq
                                             } while (s1 is odd or s1 != s2)

A reader that sees the same even value before and after its copy copied bytes that no
write overlapped: any write that started before the second read of the counter made the
counter odd (and then larger) first. The writer never waits for readers; a reader
retries at most while a write is in progress, which is a few hundred nanoseconds here.

Why it is correct from Python on x86-64
---------------------------------------
The protocol needs three orderings: (1) the writer's odd store is visible before any
payload store, (2) every payload store is visible before the final even store, and (3)
the reader's payload loads happen after its first counter load and before its second.

* Hardware. x86-64 is TSO (Intel SDM vol. 3, 8.2.2): stores become visible to other
  cores in program order, and loads are not reordered with other loads. Stores inside
  one `rep movs` (memcpy's fast-string path) may be reordered among themselves, but
  never with the stores before or after the string operation (SDM 8.2.4.2), and those
  are all inside the bracket. So (1), (2) and (3) hold without fence instructions; the
  only reordering x86 allows (a later load passing an earlier store) cannot break a
  seqlock, whose reader never stores. The Linux kernel relies on exactly this: on
  x86-64 its `smp_rmb()`/`smp_wmb()` in `read_seqcount_*` are compiler barriers only.
* Compiler. Each step is a separate CPython operation (a `memoryview` item store, a
  `memcpy` inside `bytes()`/slice assignment, a `struct.pack_into`): C function calls
  through the interpreter loop on memory the compiler cannot see into, so the C
  compiler cannot move one step's loads or stores across another's.
* Atomicity of the counter. The counter is read and written through a `memoryview`
  cast to format "Q": CPython's memoryview packs and unpacks one item with a
  fixed-size 8-byte `memcpy`, which compiles to one aligned 8-byte `mov`, atomic on
  x86-64. (`struct.pack_into` is not used for the counter: its standard-size path may
  store byte by byte.) The counter offset must be a multiple of 8 in a buffer whose
  base is 8-aligned (mmap'ed segments are page-aligned).

On a weakly ordered CPU (ARM64, POWER) the same Python code would need explicit
barriers, which CPython does not expose: this module is validated on x86-64 only
(tests/integration/test_shm.py counts torn snapshots under a full-speed writer in
another process, and a control without validation shows the test does see tearing).

Only one writer may exist per counter; readers never write. A writer that dies with the
counter odd leaves it odd forever: readers see `SeqlockBusy` (bounded retries) and the
shell turns the writer's death into the STALE state.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Sequence
from operator import neg

from bookd.layout import (
    LAYOUT_VERSION,
    MAX_PRECISION,
    MAX_U32,
    MAX_U64,
    P_MAGIC,
    P_MISMATCHES,
    P_PRICE_PRECISION,
    P_PUBLISH,
    P_QTY_PRECISION,
    P_RESYNCS,
    P_SEQ,
    P_STATE,
    PAIR_HEADER_SIZE,
    PAIR_MAGIC,
    PAIR_STATIC,
    BookState,
    LayoutError,
    SeqlockBusy,
    ValueOutOfRange,
    WriterClosed,
    encode_name,
    pair_geometry,
)

DEFAULT_TRIES = 1000
_VALID = int(BookState.VALID)
_MAX_STATE = max(BookState)

BIDS = 1  # `changed` bits of BookPublisher.publish_book: which sides of the book differ
ASKS = 2  # from the previous publish of that pair

# The publish block (layout.pair_geometry(depth).publish) is this 40-byte head (state,
# n_bids, n_asks, checksum, exchange ts, recv ns, updates), then 2*depth u64 of bids
# (prices, qtys), then 2*depth u64 of asks: publish_book packs the head and only the
# sides that changed, each with its own Struct, into the same scratch image.
_HEAD = struct.Struct("<IIIIQQQ")
_BIDS_AT = _HEAD.size  # offset of the bid side in the publish block
if _BIDS_AT != PAIR_HEADER_SIZE - P_PUBLISH:
    raise ImportError("bookd.seqlock: publish head does not match bookd.layout")


def _bytes_view(buf: object) -> memoryview:
    mv = memoryview(buf)  # type: ignore[arg-type]
    if not mv.c_contiguous:
        raise ValueError("seqlock buffer must be C-contiguous")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def _counter_view(mv: memoryview, offset: int) -> memoryview:
    if offset % 8 or offset < 0 or offset + 8 > mv.nbytes:
        raise ValueError(f"seqlock counter offset {offset} must be 8-aligned and inside "
                         f"the buffer ({mv.nbytes} bytes)")
    return mv[offset:offset + 8].cast("Q")


def _check_region(mv: memoryview, counter: int, start: int, end: int) -> None:
    if not 0 <= start <= end <= mv.nbytes:
        raise ValueError(f"payload region {start}..{end} outside the buffer ({mv.nbytes})")
    if start < counter + 8 and counter < end:
        raise ValueError("the payload region must not contain the counter")


class SeqlockWriter:
    """The one writer of a seqlock: `write(data)` or `begin()` ... `end()`.

    `buf` is any writable buffer (bytearray, memoryview of an mmap, numpy array);
    `counter` is the offset of the uint64 counter; `start`..`end` is the payload region
    that `write()` fills. The writer keeps the counter value in a Python int (it is the
    only writer) and stores it with single aligned 8-byte writes.
    """

    __slots__ = ("_buf", "_seq_mv", "_dst", "_seq", "payload_start", "payload_end")

    def __init__(self, buf: object, counter: int, start: int, end: int) -> None:
        mv = _bytes_view(buf)
        if mv.readonly:
            raise ValueError("seqlock writer needs a writable buffer")
        _check_region(mv, counter, start, end)
        self._buf = mv
        self._seq_mv = _counter_view(mv, counter)
        self._dst = mv[start:end]
        self.payload_start, self.payload_end = start, end
        seq = self._seq_mv[0]
        if seq & 1:  # left odd by a writer that died mid-write: readers must not wait
            seq += 1
            self._seq_mv[0] = seq
        self._seq = seq

    @property
    def seq(self) -> int:
        return self._seq

    def write(self, data: object) -> None:
        """Copy `data` (exactly end - start bytes) into the payload region under the lock."""
        s = self._seq + 1
        w = self._seq_mv
        w[0] = s            # odd: readers retry from here
        self._dst[:] = data  # one memcpy
        s += 1
        w[0] = s            # even: consistent again
        self._seq = s

    def begin(self) -> None:
        """Make the counter odd; the caller writes payload bytes, then calls `end()`."""
        s = self._seq + 1
        self._seq_mv[0] = s
        self._seq = s

    def end(self) -> None:
        s = self._seq + 1
        self._seq_mv[0] = s
        self._seq = s

    def release(self) -> None:
        """Release the memoryviews on the buffer (before the buffer is unmapped)."""
        self._dst.release()
        self._seq_mv.release()
        self._buf.release()


class SeqlockReader:
    """A reader of a seqlock: consistent copies of the payload region, or begin/validate.

    `read()` returns a `bytes` copy of `start`..`end` taken between two equal even
    counter values, retrying up to `tries` times and raising `SeqlockBusy` after that.
    `try_read()` makes one attempt and returns None when it raced a write. `begin()` and
    `validate()` let a caller read fields in place (zero copy) and then check that they
    were consistent.
    """

    __slots__ = ("_buf", "_seq_mv", "_src", "retries", "payload_start", "payload_end")

    def __init__(self, buf: object, counter: int, start: int, end: int) -> None:
        mv = _bytes_view(buf)
        _check_region(mv, counter, start, end)
        self._buf = mv
        self._seq_mv = _counter_view(mv, counter)
        self._src = mv[start:end]
        self.payload_start, self.payload_end = start, end
        self.retries = 0  # attempts that raced a write (odd or changed counter)

    def try_read(self) -> bytes | None:
        w = self._seq_mv
        s1 = w[0]
        if s1 & 1:
            self.retries += 1
            return None
        data = self._src.tobytes()
        if w[0] != s1:
            self.retries += 1
            return None
        return data

    def read(self, tries: int = DEFAULT_TRIES) -> bytes:
        w = self._seq_mv
        src = self._src
        for _ in range(tries):
            s1 = w[0]
            if not s1 & 1:
                data = src.tobytes()
                if w[0] == s1:
                    return data
            self.retries += 1
        raise SeqlockBusy(f"seqlock counter odd or changing for {tries} attempts")

    def read_versioned(self, tries: int = DEFAULT_TRIES) -> tuple[int, bytes]:
        """Like `read()`, also returning the (even) counter value the copy belongs to."""
        w = self._seq_mv
        src = self._src
        for _ in range(tries):
            s1 = w[0]
            if not s1 & 1:
                data = src.tobytes()
                if w[0] == s1:
                    return s1, data
            self.retries += 1
        raise SeqlockBusy(f"seqlock counter odd or changing for {tries} attempts")

    def begin(self) -> int | None:
        """The current counter if even (a read may start), else None (retry)."""
        s = self._seq_mv[0]
        return None if s & 1 else s

    def validate(self, token: int) -> bool:
        """True if nothing was written since `begin()` returned `token`."""
        return self._seq_mv[0] == token

    @property
    def seq(self) -> int:
        return self._seq_mv[0]

    def release(self) -> None:
        self._src.release()
        self._seq_mv.release()
        self._buf.release()


class PairWriter:
    """The writer of one pair segment (layout in bookd/layout.py) over a writable buffer.

    Construction zeroes the segment, writes the static header and then the magic number,
    last. Every later write goes through the segment's seqlock. `BookPublisher.publish`
    is the hot path that uses `pack`, `scratch` and `lock`.
    """

    __slots__ = ("pair", "index", "depth", "generation", "updates", "mismatches", "resyncs",
                 "mv", "lock", "scratch", "pack", "zeros", "u32", "u64", "pack_head",
                 "pack_side", "ask_off", "image_ok")

    def __init__(self, buf: object, pair: str, index: int, depth: int, generation: int) -> None:
        geo = pair_geometry(depth)
        mv = _bytes_view(buf)
        if mv.readonly:
            raise ValueError("PairWriter needs a writable buffer")
        if mv.nbytes < geo.size:
            raise LayoutError(f"{pair}: buffer of {mv.nbytes} bytes < segment size {geo.size}")
        self.pair, self.index, self.depth, self.generation = pair, index, depth, generation
        self.updates = self.mismatches = self.resyncs = 0
        mv = mv[:geo.size]
        mv[:] = bytes(geo.size)
        PAIR_STATIC.pack_into(mv, 0, 0, LAYOUT_VERSION, PAIR_HEADER_SIZE, depth, index,
                              generation, encode_name(pair))
        self.mv = mv
        self.lock = SeqlockWriter(mv, P_SEQ, P_PUBLISH, geo.size)
        self.scratch = bytearray(geo.publish.size)
        self.pack = geo.publish.pack_into
        self.pack_head = _HEAD.pack_into
        self.pack_side = struct.Struct(f"<{2 * depth}Q").pack_into  # prices, then qtys
        self.ask_off = _BIDS_AT + 16 * depth  # bids start right after the head
        self.image_ok = False  # scratch holds the complete image of the last publish
        self.zeros = (0,) * depth
        self.u32 = mv.cast("I")
        self.u64 = mv.cast("Q")
        self.u64[P_MAGIC // 8] = PAIR_MAGIC  # last: the segment is complete

    def check_counts(self, nb: int, na: int, nbq: int, naq: int) -> None:
        if nb != nbq or na != naq:
            raise ValueError(f"{self.pair}: {nb} bid prices but {nbq} bid qtys, {na} ask "
                             f"prices but {naq} ask qtys")
        if nb > self.depth or na > self.depth:
            raise ValueError(f"{self.pair}: {nb} bids / {na} asks exceed depth {self.depth}")

    def diagnose(self, bp: Sequence[int], bq: Sequence[int], ap: Sequence[int],
                 aq: Sequence[int], checksum: int, ts: int, recv: int) -> Exception:
        """Which value made the pack fail: ValueOutOfRange, or TypeError for a non-int."""
        self.check_counts(len(bp), len(ap), len(bq), len(aq))
        fields = [("checksum", checksum, MAX_U32), ("exchange_ts_ns", ts, MAX_U64),
                  ("recv_ns", recv, MAX_U64)]
        for side, values in (("bid_prices", bp), ("bid_qtys", bq), ("ask_prices", ap),
                             ("ask_qtys", aq)):
            fields += [(f"{side}[{k}]", v, MAX_U64) for k, v in enumerate(values)]
        for field, value, limit in fields:
            try:
                v = operator.index(value)
            except TypeError:
                return TypeError(f"{self.pair}: {field} = {value!r} is not an integer")
            if not 0 <= v <= limit:
                return ValueOutOfRange(self.pair, field, value)
        return ValueError(f"{self.pair}: the book cannot be packed")

    def set_state(self, state: int) -> None:
        value = int(state)
        if not 0 <= value <= _MAX_STATE:
            raise ValueError(f"{self.pair}: {state!r} is not a BookState")
        self.lock.begin()
        self.u32[P_STATE // 4] = value
        self.lock.end()

    def set_precision(self, price_precision: int, qty_precision: int) -> None:
        for name, v in (("price_precision", price_precision), ("qty_precision", qty_precision)):
            if not isinstance(v, int) or not 0 <= v <= MAX_PRECISION:
                raise ValueError(f"{self.pair}: {name} {v!r}: must be an integer in "
                                 f"0..{MAX_PRECISION}")
        self.lock.begin()
        self.u32[P_PRICE_PRECISION // 4] = price_precision
        self.u32[P_QTY_PRECISION // 4] = qty_precision
        self.lock.end()

    def count(self, mismatches: int = 0, resyncs: int = 0) -> None:
        if mismatches < 0 or resyncs < 0:
            raise ValueError("counters only grow")
        self.mismatches = (self.mismatches + mismatches) & MAX_U64
        self.resyncs = (self.resyncs + resyncs) & MAX_U64
        self.lock.begin()
        self.u64[P_MISMATCHES // 8] = self.mismatches
        self.u64[P_RESYNCS // 8] = self.resyncs
        self.lock.end()

    def release(self) -> None:
        """Release every view on the buffer (before it is unmapped)."""
        self.lock.release()
        self.u32.release()
        self.u64.release()
        self.mv.release()


class BookPublisher:
    """The writer side of a set of pair segments, given their buffers (pure core).

    `bookd.shm.BookWriter` is this plus the shared-memory lifecycle (create, reclaim,
    heartbeat, close). Unit tests use it over bytearrays.

    `publish()` packs the whole publish block of the pair (state VALID, counts,
    checksum, timestamps, update counter and the four level arrays zero-padded to depth)
    with ONE `struct.pack_into` into a private scratch buffer, then copies it into the
    segment with one seqlock-protected memcpy. Packing first is what makes a value that
    is negative or >= 2**64 fail with `ValueOutOfRange` before a single byte of the
    segment changes (`struct.pack_into` zero-fills its target before it packs, so packing
    straight into the segment could not give that guarantee).
    """

    def __init__(self, buffers: Sequence[object], pairs: Sequence[str], depth: int,
                 generation: int) -> None:
        if len(buffers) != len(pairs):
            raise ValueError("one buffer per pair")
        self.pairs = tuple(pairs)
        self.depth = depth
        self.generation = generation
        self._writers = [PairWriter(b, p, i, depth, generation)
                         for i, (b, p) in enumerate(zip(buffers, pairs, strict=True))]
        self._closed = False

    def publish(self, i: int, bid_prices: Sequence[int], bid_qtys: Sequence[int],
                ask_prices: Sequence[int], ask_qtys: Sequence[int], *, checksum: int,
                exchange_ts_ns: int, recv_ns: int) -> None:
        """Publish pair `i`'s book (best first, at most depth levels) and mark it VALID.

        A value that is negative or >= 2**64 (checksum: >= 2**32) raises
        `ValueOutOfRange` (an OverflowError) naming it, and nothing is written: the
        caller then marks the pair HALTED. Lists of different lengths or longer than
        depth raise ValueError, non-integers TypeError, also without writing.
        """
        if self._closed:
            raise WriterClosed(f"the writer of {self.pairs[i]} is closed")
        pw = self._writers[i]
        nb = len(bid_prices)
        na = len(ask_prices)
        d = self.depth
        updates = pw.updates + 1
        scratch = pw.scratch
        # publish() takes its levels from the caller, not from a Book: the next
        # publish_book cannot know which of its sides still match, so it packs both.
        pw.image_ok = False
        try:
            if nb == d == na == len(bid_qtys) == len(ask_qtys):
                pw.pack(scratch, 0, _VALID, nb, na, checksum, exchange_ts_ns, recv_ns,
                        updates, *bid_prices, *bid_qtys, *ask_prices, *ask_qtys)
            else:
                pw.check_counts(nb, na, len(bid_qtys), len(ask_qtys))
                z = pw.zeros
                pw.pack(scratch, 0, _VALID, nb, na, checksum, exchange_ts_ns, recv_ns,
                        updates, *bid_prices, *z[nb:], *bid_qtys, *z[nb:],
                        *ask_prices, *z[na:], *ask_qtys, *z[na:])
        except struct.error:
            raise pw.diagnose(bid_prices, bid_qtys, ask_prices, ask_qtys, checksum,
                              exchange_ts_ns, recv_ns) from None
        self._commit(pw, updates)

    def publish_book(self, i: int, book, changed: int, checksum: int, exchange_ts_ns: int,
                     recv_ns: int) -> None:
        """`publish()` for a `bookd.book.Book` (bids keyed by -price), the hot path.

        `changed` (`BIDS | ASKS` bits) names the sides that may differ from the previous
        publish of pair `i`; the others are taken from that publish's packed image, so
        an update that touched one side packs 2*depth values instead of 4*depth (and
        negates no bid keys when the bids did not change). After any failed publish,
        or a `publish()` call, the next call packs both sides whatever `changed` says.
        Errors as in `publish()`, and nothing is written.
        """
        if self._closed:
            raise WriterClosed(f"the writer of {self.pairs[i]} is closed")
        pw = self._writers[i]
        bid_keys = book.bid_keys
        ask_keys = book.ask_keys
        nb = len(bid_keys)
        na = len(ask_keys)
        d = pw.depth
        updates = pw.updates + 1
        scratch = pw.scratch
        if not pw.image_ok:
            changed = BIDS | ASKS
        pw.image_ok = False  # until every pack below has succeeded
        try:
            pw.pack_head(scratch, 0, _VALID, nb, na, checksum, exchange_ts_ns, recv_ns,
                         updates)
            if changed & BIDS:
                if nb == d:  # a wrong qty count fails the pack: diagnose names it
                    pw.pack_side(scratch, _BIDS_AT, *map(neg, bid_keys), *book.bid_qtys)
                else:
                    pw.check_counts(nb, 0, len(book.bid_qtys), 0)
                    z = pw.zeros[nb:]
                    pw.pack_side(scratch, _BIDS_AT, *map(neg, bid_keys), *z, *book.bid_qtys, *z)
            if changed & ASKS:
                if na == d:
                    pw.pack_side(scratch, pw.ask_off, *ask_keys, *book.ask_qtys)
                else:
                    pw.check_counts(0, na, 0, len(book.ask_qtys))
                    z = pw.zeros[na:]
                    pw.pack_side(scratch, pw.ask_off, *ask_keys, *z, *book.ask_qtys, *z)
        except struct.error:
            raise pw.diagnose([-k for k in bid_keys], book.bid_qtys, ask_keys, book.ask_qtys,
                              checksum, exchange_ts_ns, recv_ns) from None
        pw.image_ok = True
        self._commit(pw, updates)

    @staticmethod
    def _commit(pw: PairWriter, updates: int) -> None:
        """Copy the packed image into the segment: SeqlockWriter.write, inlined (the
        one place both publish paths write through the seqlock)."""
        lock = pw.lock
        seq = lock._seq + 1
        counter = lock._seq_mv
        counter[0] = seq           # odd: readers retry
        lock._dst[:] = pw.scratch  # one memcpy of the whole publish block
        seq += 1
        counter[0] = seq           # even: consistent
        lock._seq = seq
        pw.updates = updates

    def _w(self, i: int) -> PairWriter:
        if self._closed:
            raise WriterClosed(f"the writer of {self.pairs[i]} is closed")
        return self._writers[i]

    def set_state(self, i: int, state: BookState) -> None:
        """Write pair `i`'s state (seqlock-protected); its levels stay as they are."""
        self._w(i).set_state(state)

    def set_precision(self, i: int, price_precision: int, qty_precision: int) -> None:
        """Write pair `i`'s tick precisions (decimals), seqlock-protected."""
        self._w(i).set_precision(price_precision, qty_precision)

    def count(self, i: int, mismatches: int = 0, resyncs: int = 0) -> None:
        """Add to pair `i`'s checksum-mismatch and resync counters (seqlock-protected)."""
        self._w(i).count(mismatches, resyncs)

    def seq(self, i: int) -> int:
        """Pair `i`'s seqlock counter (even between writes)."""
        return self._writers[i].lock.seq

    def _release(self) -> None:
        """Mark closed and release every view (the shell unmaps afterwards)."""
        self._closed = True
        for w in self._writers:
            w.release()
