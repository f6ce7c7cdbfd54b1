"""The shared-memory ABI of bookd: names, offsets, sizes and states (pure, no I/O).

Theory
------
bookd publishes one L2 book per pair into POSIX shared memory so that co-located
strategy processes, in any language, can read it without a copy through the kernel.
Two kinds of segment live under a namespace (`[system] namespace` in the config):

* the **directory** `<namespace>.books` (``/dev/shm/<namespace>.books`` on Linux): who
  writes (pid), whether it is alive (a CLOCK_MONOTONIC heartbeat), the generation and
  the list of pairs;
* one **pair segment** per pair, `<namespace>.book.<PAIR with "/" as "_">`: a header
  and four uint64 arrays (bid prices, bid quantities, ask prices, ask quantities, in
  integer ticks, best first).

Everything is little-endian with natural alignment (every field at an offset that is a
multiple of its size, every segment size a multiple of 8). Field offsets are module
constants; `DIR_FIELDS` and `PAIR_FIELDS` describe every field once, and
`describe_markdown()` renders them as the tables embedded in `docs/shm-layout.md` (a
unit test checks that the document and this module agree byte for byte).

Concurrency: the pair segment is guarded by a seqlock (`bookd/seqlock.py`): the
counter at `P_SEQ` is odd while bookd writes, and every byte from `P_PAYLOAD` to the end
of the segment is only meaningful when read between two equal, even values of it. The
fields before `P_SEQ` are written once at creation, before the magic number, which is
written last; a reader that sees the magic sees them all. The directory has no seqlock:
its mutable fields (`D_PID`, `D_HEARTBEAT_NS`) are single aligned words that the writer
stores in one instruction.

States and the stale rule: the writer stores one of `BookState` in each pair segment. A
reader reports `effective_state()`: HALTED whatever else is true (a halt is final), else
STALE if the writer is gone (pid 0 after a clean close, dead pid, or a heartbeat older
than `STALE_AFTER_NS`), else what the segment says.

Numbers: prices and quantities are integer ticks at the pair's precisions (DESIGN.md
section 2) held as uint64. A value that does not fit (negative or >= 2**64) is refused
with `ValueOutOfRange` and never wraps.
"""

from __future__ import annotations

import re
import struct
from enum import IntEnum
from functools import lru_cache
from typing import NamedTuple

# --------------------------------------------------------------------------- constants

LAYOUT_VERSION = 1
BYTE_ORDER = "little"
DIR_MAGIC = int.from_bytes(b"KFBKDIR\x00", "little")  # bytes "KFBKDIR\0" in memory
PAIR_MAGIC = int.from_bytes(b"KFBKPAIR", "little")    # bytes "KFBKPAIR" in memory
NAME_WIDTH = 40                 # bytes per pair name, NUL-padded (max 39 bytes of ASCII)
MAX_U64 = (1 << 64) - 1
MAX_U32 = (1 << 32) - 1
MAX_DEPTH = 65536
MAX_PRECISION = 64              # decimals; Kraken uses at most 10 or so
STALE_AFTER_NS = 1_000_000_000  # a heartbeat older than this means the writer is gone
# A heartbeat later than this many periods makes readers check whether the pid lives.
LATE_HEARTBEATS = 3

# Directory segment `<namespace>.books`: a 64-byte header, then the pair table.
D_MAGIC = 0             # u64  DIR_MAGIC
D_VERSION = 8           # u32  LAYOUT_VERSION
D_HEADER_SIZE = 12      # u32  offset of the pair table (DIR_HEADER_SIZE)
D_NAME_WIDTH = 16       # u32  bytes per pair-table entry (NAME_WIDTH)
D_N_PAIRS = 20          # u32  number of pairs
D_DEPTH = 24            # u32  depth (level capacity per side) of every pair segment
D_HEARTBEAT_MS = 28     # u32  the writer's heartbeat period
D_GENERATION = 32       # u64  generation of this bookd instance
D_PID = 40              # u32  writer pid; 0 after a clean close
D_RESERVED = 44         # u32  0
D_HEARTBEAT_NS = 48     # u64  CLOCK_MONOTONIC ns of the writer's last heartbeat
D_STARTED_NS = 56       # u64  CLOCK_REALTIME ns when the writer created the namespace
DIR_HEADER_SIZE = 64

# Pair segment `<namespace>.book.<PAIR>`: a 144-byte header, then four arrays.
P_MAGIC = 0             # u64  PAIR_MAGIC, written last at creation
P_VERSION = 8           # u32  LAYOUT_VERSION
P_HEADER_SIZE = 12      # u32  offset of the first level array (PAIR_HEADER_SIZE)
P_DEPTH = 16            # u32  level capacity per side
P_INDEX = 20            # u32  index of this pair in the directory table
P_GENERATION = 24       # u64  equals the directory's generation
P_PAIR = 32             # char[40] pair name, ASCII, NUL-padded
P_SEQ = 72              # u64  seqlock counter: odd while the writer writes
P_PAYLOAD = 80          # first seqlock-protected byte
P_PRICE_PRECISION = 80  # u32  decimals of a price tick
P_QTY_PRECISION = 84    # u32  decimals of a quantity tick
P_MISMATCHES = 88       # u64  checksum mismatches seen since creation
P_RESYNCS = 96          # u64  resyncs requested since creation
P_STATE = 104           # u32  BookState
P_N_BIDS = 108          # u32  valid bid levels (<= depth)
P_N_ASKS = 112          # u32  valid ask levels (<= depth)
P_CHECKSUM = 116        # u32  Kraken CRC32 of the top 10 levels, as verified
P_EXCHANGE_TS = 120     # u64  exchange timestamp of the last update, unix ns (0: unknown)
P_RECV_NS = 128         # u64  when ingest received the last update, unix ns (0: none)
P_UPDATES = 136         # u64  books published since creation
PAIR_HEADER_SIZE = 144
P_PUBLISH = P_STATE     # start of the block one publish writes with one pack_into

# Structs (little-endian, "<": standard sizes, no implicit padding).
DIR_HEADER = struct.Struct("<QIIIIIIQIIQQ")      # D_MAGIC .. D_STARTED_NS, 64 bytes
PAIR_STATIC = struct.Struct("<QIIIIQ40s")        # P_MAGIC .. P_PAIR, 72 bytes
PAYLOAD_HEAD = struct.Struct("<IIQQIIIIQQQ")     # P_PAYLOAD .. P_UPDATES, 64 bytes
U64 = struct.Struct("<Q")
U32 = struct.Struct("<I")


class BookState(IntEnum):
    """State of one pair's book, as stored in the u32 at `P_STATE`."""

    EMPTY = 0      # created, no data yet
    VALID = 1      # checksum verified on the last message
    RESYNCING = 2  # checksum mismatch or sequence gap: a fresh snapshot is on its way
    STALE = 3      # no writer, or no data within the liveness limit
    HALTED = 4     # the halt authority stopped the system, or a value cannot be represented

    @property
    def word(self) -> str:
        """The lower-case word tools print: empty, valid, resyncing, stale, halted."""
        return self.name.lower()


FINAL_STATES = (BookState.STALE, BookState.HALTED)
_STATES = tuple(BookState)  # value -> member, faster than BookState(value)

# --------------------------------------------------------------------------- errors


class ShmError(Exception):
    """Base class of every shared-memory error of bookd."""


class LayoutError(ShmError):
    """A segment does not match this ABI (magic, version, header size or length)."""


class ValueOutOfRange(ShmError, OverflowError):
    """A value cannot be stored as uint64 (or uint32 for checksums); nothing was written."""

    def __init__(self, pair: str, field: str, value: object) -> None:
        self.pair, self.field, self.value = pair, field, value
        super().__init__(f"{pair}: {field} = {value!r} does not fit the shared-memory "
                         f"field (unsigned, < 2**{32 if field == 'checksum' else 64})")


class NamespaceBusy(ShmError):
    """A live bookd already owns the segments of this namespace."""

    def __init__(self, namespace: str, pid: int, detail: str = "") -> None:
        self.namespace, self.pid = namespace, pid
        super().__init__(f"namespace {namespace!r} is owned by a running bookd (pid {pid})"
                         f"{': ' + detail if detail else ''}; stop it first, or use another "
                         f"[system] namespace")


class WriterClosed(ShmError):
    """The BookWriter was closed; its segments are gone."""


class AttachTimeout(ShmError, TimeoutError):
    """No live book for this pair appeared in time."""

    def __init__(self, pair: str, namespace: str, timeout: float, detail: str) -> None:
        self.pair, self.namespace, self.timeout = pair, namespace, timeout
        super().__init__(f"no book for pair {pair!r} in namespace {namespace!r} after "
                         f"{timeout:g} s: {detail}")


class ViewExpired(ShmError):
    """A zero-copy view was used after its context exited or its book was replaced."""


class SeqlockBusy(ShmError):
    """The seqlock counter stayed odd or kept changing for every attempt."""


# --------------------------------------------------------------------------- names

# No "." in namespaces: "<ns>.book.<PAIR>" must never equal another namespace's name.
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PAIR_RE = re.compile(r"[A-Za-z0-9.\-]{1,19}/[A-Za-z0-9.\-]{1,19}|[A-Za-z0-9.\-]{1,39}")


def check_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE_RE.fullmatch(namespace):
        raise ValueError(f"namespace {namespace!r}: must be 1-64 characters of "
                         f"A-Z a-z 0-9 _ -")
    return namespace


def check_pair(pair: str) -> str:
    if not isinstance(pair, str) or not _PAIR_RE.fullmatch(pair):
        raise ValueError(f"pair {pair!r}: must be BASE/QUOTE of A-Z a-z 0-9 . -, at most "
                         f"{NAME_WIDTH - 1} characters")
    return pair


def directory_name(namespace: str) -> str:
    """SharedMemory name (no leading slash) of the directory segment."""
    return f"{check_namespace(namespace)}.books"


def pair_segment_name(namespace: str, pair: str) -> str:
    """SharedMemory name (no leading slash) of a pair's segment: "/" becomes "_"."""
    return f"{check_namespace(namespace)}.book.{check_pair(pair).replace('/', '_')}"


def encode_name(pair: str) -> bytes:
    return check_pair(pair).encode("ascii").ljust(NAME_WIDTH, b"\x00")


def decode_name(raw: bytes) -> str:
    return bytes(raw).split(b"\x00", 1)[0].decode("ascii", "replace")


# --------------------------------------------------------------------------- geometry


def dir_segment_size(n_pairs: int) -> int:
    return DIR_HEADER_SIZE + NAME_WIDTH * n_pairs


def dir_entry_offset(index: int) -> int:
    return DIR_HEADER_SIZE + NAME_WIDTH * index


class PairGeometry(NamedTuple):
    """Offsets of the level arrays of a pair segment of a given depth."""

    depth: int
    bid_prices: int   # u64[depth]
    bid_qtys: int     # u64[depth]
    ask_prices: int   # u64[depth]
    ask_qtys: int     # u64[depth]
    size: int         # total segment size: PAIR_HEADER_SIZE + 32 * depth
    publish: struct.Struct  # P_STATE .. end: state, n_bids, n_asks, checksum, ts, recv,
    #                         updates, then the four arrays; one pack_into per publish


@lru_cache(maxsize=64)
def pair_geometry(depth: int) -> PairGeometry:
    if not isinstance(depth, int) or not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"depth {depth!r}: must be an integer in 1..{MAX_DEPTH}")
    base = PAIR_HEADER_SIZE
    step = 8 * depth
    return PairGeometry(
        depth, base, base + step, base + 2 * step, base + 3 * step, base + 4 * step,
        struct.Struct(f"<IIIIQQQ{4 * depth}Q"))


def pair_segment_size(depth: int) -> int:
    return pair_geometry(depth).size


# --------------------------------------------------------------------------- stale rule


def late_after_ns(heartbeat_ms: int) -> int:
    """Heartbeat age past which a reader checks the pid: `LATE_HEARTBEATS` periods, at
    least 100 ms, at most `STALE_AFTER_NS` (so "not late" always implies "alive")."""
    return min(max(LATE_HEARTBEATS * heartbeat_ms, 100) * 1_000_000, STALE_AFTER_NS)


def writer_alive(pid: int, heartbeat_ns: int, now_ns: int, heartbeat_ms: int) -> bool | None:
    """Liveness from the directory words: True, False, or None ("check the pid").

    False when the writer closed (pid 0) or its heartbeat is older than
    `STALE_AFTER_NS`. None when the heartbeat is late (`late_after_ns`): the caller
    should then check that the pid still lives, so a `kill -9` is noticed well before
    the 1 s limit. True otherwise.
    """
    if pid == 0:
        return False
    age = now_ns - heartbeat_ns
    if age > STALE_AFTER_NS:
        return False
    if age > late_after_ns(heartbeat_ms):
        return None
    return True


def effective_state(segment_state: int, writer_ok: bool) -> BookState:
    """The state a reader reports: HALTED wins, then STALE if the writer is gone."""
    if not 0 <= segment_state < len(_STATES):  # unknown to this ABI: do not trust the book
        return BookState.STALE
    state = _STATES[segment_state]
    if state is BookState.HALTED:
        return state
    if not writer_ok:
        return BookState.STALE
    return state


# --------------------------------------------------------------------------- description


class Field(NamedTuple):
    """One field: its offset is `offset + per_depth * D` (D = depth; arrays only)."""

    offset: int
    name: str
    ctype: str
    doc: str
    per_depth: int = 0

    @property
    def size(self) -> int | None:
        """Size in bytes; None for the depth-sized arrays (8*D)."""
        base = {"uint64_t": 8, "uint32_t": 4, "char": 1}[self.ctype.split("[")[0]]
        if "[" in self.ctype:
            count = self.ctype.split("[")[1].rstrip("]")
            return base * int(count) if count.isdigit() else None
        return base

    def at(self, depth: int) -> int:
        return self.offset + self.per_depth * depth


_S = " [seqlock]"
DIR_FIELDS: tuple[Field, ...] = (
    Field(D_MAGIC, "magic", "uint64_t", 'DIR_MAGIC, the bytes "KFBKDIR\\0"; 0 while the writer is still creating the namespace'),
    Field(D_VERSION, "layout_version", "uint32_t", f"LAYOUT_VERSION ({LAYOUT_VERSION}); readers refuse other values"),
    Field(D_HEADER_SIZE, "header_size", "uint32_t", f"offset of the pair table ({DIR_HEADER_SIZE})"),
    Field(D_NAME_WIDTH, "name_width", "uint32_t", f"bytes per pair-table entry ({NAME_WIDTH})"),
    Field(D_N_PAIRS, "n_pairs", "uint32_t", "number of pairs in the table"),
    Field(D_DEPTH, "depth", "uint32_t", "level capacity per side (D) of every pair segment"),
    Field(D_HEARTBEAT_MS, "heartbeat_ms", "uint32_t", "period of the writer's heartbeat"),
    Field(D_GENERATION, "generation", "uint64_t", "changes whenever bookd recreates the namespace; every pair segment carries the same value"),
    Field(D_PID, "pid", "uint32_t", "pid of the writer (bookd); 0 after a clean close"),
    Field(D_RESERVED, "reserved", "uint32_t", "0"),
    Field(D_HEARTBEAT_NS, "heartbeat_ns", "uint64_t", "CLOCK_MONOTONIC ns of the last heartbeat, one aligned 8-byte store"),
    Field(D_STARTED_NS, "started_unix_ns", "uint64_t", "CLOCK_REALTIME ns when the writer created the namespace"),
    Field(DIR_HEADER_SIZE, "pairs", f"char[{NAME_WIDTH}]", f"n_pairs entries, entry i at {DIR_HEADER_SIZE} + {NAME_WIDTH}*i: pair name (e.g. BTC/USD), ASCII, NUL-padded"),
)

PAIR_FIELDS: tuple[Field, ...] = (
    Field(P_MAGIC, "magic", "uint64_t", 'PAIR_MAGIC, the bytes "KFBKPAIR"; written last at creation, 0 before'),
    Field(P_VERSION, "layout_version", "uint32_t", f"LAYOUT_VERSION ({LAYOUT_VERSION})"),
    Field(P_HEADER_SIZE, "header_size", "uint32_t", f"offset of bid_prices ({PAIR_HEADER_SIZE})"),
    Field(P_DEPTH, "depth", "uint32_t", "level capacity per side (D); each array below has D entries"),
    Field(P_INDEX, "pair_index", "uint32_t", "index of this pair in the directory table"),
    Field(P_GENERATION, "generation", "uint64_t", "equals the directory's generation"),
    Field(P_PAIR, "pair", f"char[{NAME_WIDTH}]", "pair name, ASCII, NUL-padded"),
    Field(P_SEQ, "seq", "uint64_t", f"seqlock counter: odd while the writer writes; bytes {P_PAYLOAD}.. are consistent only between two equal even reads"),
    Field(P_PRICE_PRECISION, "price_precision", "uint32_t", "decimals of a price tick: price = price_ticks / 10**price_precision" + _S),
    Field(P_QTY_PRECISION, "qty_precision", "uint32_t", "decimals of a quantity tick" + _S),
    Field(P_MISMATCHES, "mismatches", "uint64_t", "checksum mismatches since creation" + _S),
    Field(P_RESYNCS, "resyncs", "uint64_t", "resyncs requested since creation" + _S),
    Field(P_STATE, "state", "uint32_t", "BookState: 0 empty, 1 valid, 2 resyncing, 3 stale, 4 halted" + _S),
    Field(P_N_BIDS, "n_bids", "uint32_t", "valid bid levels, <= D" + _S),
    Field(P_N_ASKS, "n_asks", "uint32_t", "valid ask levels, <= D" + _S),
    Field(P_CHECKSUM, "checksum", "uint32_t", "Kraken CRC32 of the top 10 levels of the last verified message" + _S),
    Field(P_EXCHANGE_TS, "exchange_ts_ns", "uint64_t", "exchange timestamp of the last update, unix ns; 0 if unknown" + _S),
    Field(P_RECV_NS, "recv_ns", "uint64_t", "receive time of the last update, unix ns; 0 before the first" + _S),
    Field(P_UPDATES, "updates", "uint64_t", "books published since creation" + _S),
    Field(PAIR_HEADER_SIZE, "bid_prices", "uint64_t[D]", "bid price ticks, best (highest) first; entries >= n_bids are 0" + _S),
    Field(PAIR_HEADER_SIZE, "bid_qtys", "uint64_t[D]", "bid quantity ticks, same order" + _S, 8),
    Field(PAIR_HEADER_SIZE, "ask_prices", "uint64_t[D]", "ask price ticks, best (lowest) first; entries >= n_asks are 0" + _S, 16),
    Field(PAIR_HEADER_SIZE, "ask_qtys", "uint64_t[D]", "ask quantity ticks, same order" + _S, 24),
)


def describe() -> dict[str, tuple[Field, ...]]:
    """Every field of both segment kinds, in offset order."""
    return {"directory": DIR_FIELDS, "pair": PAIR_FIELDS}


def describe_markdown() -> str:
    """The two field tables of docs/shm-layout.md, generated from `describe()`."""
    out: list[str] = []
    titles = {"directory": "Directory segment `<namespace>.books`",
              "pair": "Pair segment `<namespace>.book.<BASE>_<QUOTE>` (D = depth)"}
    for kind, fields in describe().items():
        out += [f"#### {titles[kind]}", "",
                "| offset | size | type | field | meaning |",
                "|-------:|-----:|------|-------|---------|"]
        for f in fields:
            off = f"{f.offset} + {f.per_depth}*D" if f.per_depth else str(f.offset)
            size = "8*D" if f.size is None else str(f.size)
            out.append(f"| {off} | {size} | `{f.ctype}` | `{f.name}` | {f.doc} |")
        out.append("")
    size_d = f"{DIR_HEADER_SIZE} + {NAME_WIDTH}*n_pairs"
    size_p = f"{PAIR_HEADER_SIZE} + 32*D"
    out.append(f"Segment sizes: directory {size_d} bytes; pair {size_p} bytes.")
    return "\n".join(out) + "\n"


if __name__ == "__main__":  # python -m bookd.layout: print the tables for the docs
    print(describe_markdown())
