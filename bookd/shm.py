"""The shared-memory shell of bookd: segment lifecycle and the one writer (`BookWriter`).

Everything that touches POSIX shared memory lives here; the ABI itself is in
`bookd/layout.py` and the seqlock protocol in `bookd/seqlock.py`.

Lifecycle of a namespace (one bookd owns it; docs/shm-layout.md has the full story):

1. **Claim.** `BookWriter(...)` looks at `<ns>.books`. If it exists and its pid is a
   live, non-zombie process with a fresh heartbeat (or one still creating it), a bookd
   owns the namespace: `NamespaceBusy` names the pid. Otherwise the segments are
   leftovers of a crashed bookd: every name listed there is unlinked (readers still
   attached keep their mappings and see the writer dead, hence STALE).
2. **Create.** The directory is created with O_CREAT|O_EXCL (mode 0600, so two bookd
   starting at once cannot both win), then one segment per pair (leftovers of the same
   name are unlinked first: the directory is ours). Static header fields are written
   before the magic numbers, which are written last: a reader that sees the directory
   magic sees complete pair segments. The generation is the creation time in unix ns,
   bumped above any reclaimed predecessor's, so it differs from every earlier one.
3. **Run.** `publish`, `set_state`, `set_precision`, `count` write under the pair's
   seqlock; `heartbeat` is one aligned 8-byte store into the directory.
4. **Close.** `close(final_state)` writes STALE or HALTED into every pair segment, sets
   the directory pid to 0, unlinks every pair name and the directory last (only names
   that still refer to the segments this writer created), and unmaps.

CPython's resource_tracker (cpython gh-82300): on 3.11/3.12 `SharedMemory` registers
every segment it opens with a tracker process that unlinks it when the process exits,
so a reader's exit would destroy bookd's books, and a killed bookd's tracker would race
its successor. The writer therefore unregisters each segment it creates (or passes
`track=False` on 3.13+) and unlinks explicitly on close; readers never go through
`SharedMemory` at all: `ReadOnlyMapping` opens the name O_RDONLY and maps it PROT_READ,
so a reader can neither unlink nor scribble on a book, and no tracker is involved.
"""

from __future__ import annotations

import _posixshmem
import logging
import mmap
import os
import sys
import time
from collections.abc import Sequence
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import NamedTuple

from bookd.layout import (
    D_HEARTBEAT_NS,
    D_MAGIC,
    D_PID,
    DIR_HEADER,
    DIR_HEADER_SIZE,
    DIR_MAGIC,
    FINAL_STATES,
    LAYOUT_VERSION,
    NAME_WIDTH,
    AttachTimeout,
    BookState,
    LayoutError,
    NamespaceBusy,
    ShmError,
    ValueOutOfRange,
    WriterClosed,
    decode_name,
    dir_entry_offset,
    dir_segment_size,
    directory_name,
    encode_name,
    pair_geometry,
    pair_segment_name,
)
from bookd.seqlock import BookPublisher, SeqlockBusy

__all__ = [
    "AttachTimeout", "BookState", "BookWriter", "DirectoryInfo", "LayoutError",
    "NamespaceBusy", "ReadOnlyMapping", "SeqlockBusy", "ShmError", "ValueOutOfRange",
    "WriterClosed",
    "parse_directory", "pid_alive", "read_directory", "unlink_namespace",
]

log = logging.getLogger("bookd.shm")

if sys.byteorder != "little":  # the ABI is little-endian and the counters use native "Q"
    raise ImportError("bookd shared memory requires a little-endian host")

RECLAIM_AFTER_NS = 10_000_000_000  # a live pid silent this long no longer owns a namespace
STARTING_GRACE_NS = 5_000_000_000  # a half-created directory younger than this is busy


# --------------------------------------------------------------------------- OS helpers


def pid_alive(pid: int) -> bool:
    """True if `pid` is a running process (zombies count as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no /proc: trust kill(0)
    state = stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def _unlink(name: str) -> bool:
    try:
        _posixshmem.shm_unlink("/" + name)
        return True
    except FileNotFoundError:
        return False


def _inode(name: str) -> int | None:
    try:
        fd = _posixshmem.shm_open("/" + name, os.O_RDONLY, mode=0o600)
    except FileNotFoundError:
        return None
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def _unlink_if(name: str, ino: int) -> bool:
    """Unlink `name` only if it still is the segment with inode `ino`."""
    if _inode(name) != ino:
        return False
    return _unlink(name)


def _create(name: str, size: int) -> SharedMemory:
    """Create a 0600 segment (O_EXCL) that the resource tracker does not know about."""
    if sys.version_info >= (3, 13):
        return SharedMemory(name, create=True, size=size, track=False)
    shm = SharedMemory(name, create=True, size=size)
    resource_tracker.unregister(shm._name, "shared_memory")  # gh-82300
    return shm


class ReadOnlyMapping:
    """A segment opened O_RDONLY and mapped PROT_READ (readers; never tracked).

    `buf` is a read-only memoryview; numpy arrays made from it are read-only. `close()`
    unmaps unless arrays made from `buf` are still alive, in which case the mapping is
    released when the last of them is garbage-collected (never a dangling pointer).
    """

    __slots__ = ("name", "mm", "buf", "size", "ino", "ctime_ns", "_views")

    def __init__(self, name: str, mm: mmap.mmap, st: os.stat_result) -> None:
        self.name, self.mm = name, mm
        self.buf = memoryview(mm)
        self.size, self.ino, self.ctime_ns = st.st_size, st.st_ino, st.st_ctime_ns
        self._views: list[memoryview] = []

    @classmethod
    def open(cls, name: str) -> ReadOnlyMapping | None:
        """Map `name`, or None if it does not exist or is still empty (being created)."""
        try:
            fd = _posixshmem.shm_open("/" + name, os.O_RDONLY, mode=0o600)
        except FileNotFoundError:
            return None
        except PermissionError:
            raise PermissionError(f"shared memory segment /{name} is not readable by this "
                                  f"user (bookd creates it 0600: run as bookd's user)") from None
        try:
            st = os.fstat(fd)
            if st.st_size == 0:
                return None
            mm = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        return cls(name, mm, st)

    def cast(self, fmt: str) -> memoryview:
        """A whole-segment view as uint32 ("I") or uint64 ("Q") words, released on close."""
        mv = self.buf.cast(fmt)
        self._views.append(mv)
        return mv

    def close(self) -> bool:
        """Unmap; False if user-held arrays keep the mapping alive a while longer."""
        for mv in self._views:
            mv.release()
        self._views.clear()
        try:
            self.buf.release()
            self.mm.close()
            return True
        except BufferError:
            return False


# --------------------------------------------------------------------------- directory


class DirectoryInfo(NamedTuple):
    """A one-shot reading of a namespace's directory segment."""

    namespace: str
    generation: int
    pid: int
    pairs: tuple[str, ...]
    depth: int
    heartbeat_ms: int
    heartbeat_age_ns: int
    started_unix_ns: int
    alive: bool  # pid running (not a zombie) and heartbeat younger than 1 s

    @property
    def stopped_reason(self) -> str:
        if self.alive:
            return ""
        if self.pid == 0:
            return "bookd closed the namespace"
        if not pid_alive(self.pid):
            return f"bookd pid {self.pid} is dead"
        return f"bookd pid {self.pid} has not sent a heartbeat for " \
               f"{self.heartbeat_age_ns / 1e9:.1f} s"


def parse_directory(namespace: str, m: ReadOnlyMapping) -> DirectoryInfo | None:
    """Parse a mapped directory; None while it is being created. Raises LayoutError."""
    if m.size < DIR_HEADER_SIZE:
        return None
    (magic, version, header_size, name_width, n_pairs, depth, hb_ms, generation, pid, _,
     hb_ns, started) = DIR_HEADER.unpack_from(m.buf, 0)
    if magic == 0:
        return None
    if magic != DIR_MAGIC:
        raise LayoutError(f"/{m.name} is not a bookd directory (magic {magic:#x})")
    if version != LAYOUT_VERSION or header_size != DIR_HEADER_SIZE or name_width != NAME_WIDTH:
        raise LayoutError(f"/{m.name} has layout version {version} (header {header_size}, "
                          f"names {name_width}); this reader understands version "
                          f"{LAYOUT_VERSION}")
    if m.size < dir_segment_size(n_pairs):
        raise LayoutError(f"/{m.name} is {m.size} bytes, too small for {n_pairs} pairs")
    pairs = tuple(decode_name(m.buf[dir_entry_offset(i):dir_entry_offset(i) + NAME_WIDTH])
                  for i in range(n_pairs))
    age = time.monotonic_ns() - hb_ns
    alive = pid != 0 and age <= 1_000_000_000 and pid_alive(pid)
    return DirectoryInfo(namespace, generation, pid, pairs, depth, hb_ms, age, started, alive)


def read_directory(namespace: str) -> DirectoryInfo | None:
    """The directory of `namespace`, or None if there is none (or it is half-created)."""
    m = ReadOnlyMapping.open(directory_name(namespace))
    if m is None:
        return None
    try:
        return parse_directory(namespace, m)
    finally:
        m.close()


def unlink_namespace(namespace: str, pairs: Sequence[str] = ()) -> list[str]:
    """Unlink the directory and every pair segment it lists (plus `pairs`).

    For operators and tests cleaning up after a crash; it does not check liveness.
    Returns the names removed.
    """
    names = [pair_segment_name(namespace, p) for p in pairs]
    m = ReadOnlyMapping.open(directory_name(namespace))
    if m is not None:
        try:
            info = parse_directory(namespace, m)
        except LayoutError:
            info = None
        finally:
            m.close()
        if info is not None:
            names += [pair_segment_name(namespace, p) for p in info.pairs]
    names.append(directory_name(namespace))
    return [n for n in dict.fromkeys(names) if _unlink(n)]


# --------------------------------------------------------------------------- writer


class BookWriter(BookPublisher):
    """The single writer of a namespace's books (used by the bookd service).

    `pairs[i]` is written with `publish(i, ...)`, `set_state(i, ...)`,
    `set_precision(i, ...)` and `count(i, ...)` (inherited from the pure
    `bookd.seqlock.BookPublisher`); this class adds the lifecycle: claim or reclaim the
    namespace, create the segments, `heartbeat()`, `close()`. Not thread-safe: one
    thread owns it. Raises `NamespaceBusy` if a live bookd owns the namespace.
    """

    def __init__(self, namespace: str, pairs: Sequence[str], depth: int,
                 heartbeat_ms: int = 100) -> None:
        self._closed = True  # until BookPublisher.__init__ has run
        self.namespace = namespace
        pairs = tuple(pairs)
        if not pairs:
            raise ValueError("BookWriter needs at least one pair")
        names = [pair_segment_name(namespace, p) for p in pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"pairs {list(pairs)} map to duplicate segment names")
        size = pair_geometry(depth).size
        if not isinstance(heartbeat_ms, int) or not 1 <= heartbeat_ms <= 60_000:
            raise ValueError(f"heartbeat_ms {heartbeat_ms!r}: must be an integer in 1..60000")
        self.heartbeat_ms = heartbeat_ms
        self.dir_name = directory_name(namespace)
        self.segment_names = tuple(names)
        self.pid = os.getpid()
        self._shms: list[tuple[str, SharedMemory, int]] = []  # (name, segment, inode)
        for _ in range(5):
            prev_generation = self._reclaim()
            generation = max(time.time_ns(), prev_generation + 1)
            try:
                self._dir = _create(self.dir_name, dir_segment_size(len(pairs)))
                break
            except FileExistsError:
                continue  # another bookd won the race: the next _reclaim names it
        else:
            raise NamespaceBusy(namespace, 0, "its directory keeps reappearing")
        try:
            self._build(pairs, depth, size, generation)
        except BaseException:
            self._abort()
            raise
        log.info("shm: namespace %s generation %d: %d pairs at depth %d", namespace,
                 generation, len(pairs), depth)

    # -- creation ---------------------------------------------------------------------
    def _reclaim(self) -> int:
        """Remove a crashed bookd's segments; return its generation (0 if none)."""
        m = ReadOnlyMapping.open(self.dir_name)
        if m is None:
            return 0
        try:
            return self._reclaim_from(m)
        finally:
            m.close()

    def _reclaim_from(self, m: ReadOnlyMapping) -> int:
        ns = self.namespace
        age_created = time.time_ns() - m.ctime_ns
        if m.size < DIR_HEADER_SIZE:
            if age_created < STARTING_GRACE_NS:
                raise NamespaceBusy(ns, 0, "another bookd is creating it right now")
            magic = pid = generation = hb_ns = 0
        else:
            raw = DIR_HEADER.unpack_from(m.buf, 0)
            magic, generation, pid, hb_ns = raw[0], raw[7], raw[8], raw[10]
        if pid and pid_alive(pid):
            silent = time.monotonic_ns() - hb_ns
            if magic != DIR_MAGIC or silent < RECLAIM_AFTER_NS:
                raise NamespaceBusy(ns, pid)
            log.warning("shm: pid %d is alive but silent for %.0f s; reclaiming %s",
                        pid, silent / 1e9, ns)
        elif magic == 0 and pid == 0 and age_created < STARTING_GRACE_NS:
            raise NamespaceBusy(ns, 0, "another bookd is creating it right now")
        old_pairs: tuple[str, ...] = ()
        if magic == DIR_MAGIC:
            try:
                info = parse_directory(ns, m)
                old_pairs = info.pairs if info else ()
            except LayoutError as e:
                log.warning("shm: leftover directory of another layout: %s", e)
        removed = [n for n in (pair_segment_name(ns, p) for p in old_pairs) if _unlink(n)]
        _unlink_if(self.dir_name, m.ino)
        log.warning("shm: reclaimed namespace %s left by pid %d (generation %d): removed %s",
                    ns, pid, generation, ", ".join(removed + [self.dir_name]))
        return generation if magic == DIR_MAGIC else 0

    def _build(self, pairs: tuple[str, ...], depth: int, size: int, generation: int) -> None:
        d = self._dir
        self._dir_ino = os.fstat(d._fd).st_ino
        DIR_HEADER.pack_into(d.buf, 0, 0, LAYOUT_VERSION, DIR_HEADER_SIZE, NAME_WIDTH,
                             len(pairs), depth, self.heartbeat_ms, generation,
                             self.pid, 0, time.monotonic_ns(), time.time_ns())
        for i, pair in enumerate(pairs):
            off = dir_entry_offset(i)
            d.buf[off:off + NAME_WIDTH] = encode_name(pair)
        self._dir_u32 = d.buf.cast("I")
        self._dir_u64 = d.buf.cast("Q")
        for name in self.segment_names:
            try:
                shm = _create(name, size)
            except FileExistsError:  # a leftover without a directory: the namespace is ours
                log.warning("shm: removing leftover segment /%s", name)
                _unlink(name)
                shm = _create(name, size)
            self._shms.append((name, shm, os.fstat(shm._fd).st_ino))
        # The pure core writes every pair header, magic last; then the directory magic.
        BookPublisher.__init__(self, [shm.buf for _, shm, _ in self._shms], pairs, depth,
                               generation)
        self._dir_u64[D_MAGIC // 8] = DIR_MAGIC  # last of all: the namespace is complete

    def _abort(self) -> None:
        for w in getattr(self, "_writers", ()):
            w.release()
        for name, shm, ino in self._shms:
            _unlink_if(name, ino)
            shm.close()
        if hasattr(self, "_dir_u32"):
            self._dir_u32.release()
            self._dir_u64.release()
        _unlink_if(self.dir_name, self._dir_ino)
        self._dir.close()

    # -- the service's calls (publish, set_state, ... come from BookPublisher) ----
    def heartbeat(self, now_ns: int | None = None) -> None:
        """Store CLOCK_MONOTONIC ns (default: now) into the directory: one 8-byte store."""
        if self._closed:
            raise WriterClosed(f"BookWriter for namespace {self.namespace!r} is closed")
        self._dir_u64[D_HEARTBEAT_NS // 8] = time.monotonic_ns() if now_ns is None else now_ns

    def index(self, pair: str) -> int:
        return self.pairs.index(pair)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- shutdown ---------------------------------------------------------------------
    def close(self, final_state: BookState = BookState.STALE) -> None:
        """Write `final_state` (STALE or HALTED) everywhere, unlink every name, unmap.

        Readers already attached keep their mappings and see the final state (and pid 0,
        hence no live writer); new attaches wait for the next bookd. Idempotent.
        """
        final = BookState(final_state)
        if final not in FINAL_STATES:
            raise ValueError(f"final state must be STALE or HALTED, not {final.name}")
        if self._closed:
            return
        for w in self._writers:
            w.set_state(final)
        self._dir_u32[D_PID // 4] = 0
        self._release()  # closed from here on
        for name, _, ino in self._shms:
            if not _unlink_if(name, ino):
                log.warning("shm: /%s was already replaced or removed", name)
        _unlink_if(self.dir_name, self._dir_ino)  # directory last
        for _, shm, _ in self._shms:
            shm.close()
        self._dir_u32.release()
        self._dir_u64.release()
        self._dir.close()
        log.info("shm: namespace %s closed, books marked %s", self.namespace, final.word)

    def __enter__(self) -> BookWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(BookState.STALE)

    def __repr__(self) -> str:
        return (f"BookWriter(namespace={self.namespace!r}, pairs={list(self.pairs)!r}, "
                f"depth={self.depth}, generation={self.generation}, "
                f"{'closed' if self._closed else 'open'})")
