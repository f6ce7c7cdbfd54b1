"""The recorder: every WebSocket frame ingest receives (and sends), into a recording.

Two ways in: `python -m ingest ... --record PATH` records while ingest runs, and
`python -m ingest.record --out PATH [--duration S]` is a standalone recorder (the
normal ingest session with recording on, talking to no bookd and no bus).

Theory of operation
-------------------
The event loop (ingest's receive hot path) only appends `(rx_ns, frame, tx)` to a
bounded `collections.deque` (`--record-queue`, default 100000 frames): one length
check, one append, no lock, no I/O. A full queue drops the frame and counts it
(`record_drops`); nothing else happens on the hot path. A background thread (daemon,
"recorder") pops frames in batches and writes them with `replay.recording.
RecordingWriter` (DESIGN.md section 3): `{"rx_ns":N,"frame":<bytes verbatim>}` lines,
`"dir":"tx"` for client-sent frames, `raw_b64` for a frame that is not exactly one JSON
value (the writer checks with `msgspec.json.decode` in this thread, never on the hot
path), gzip when the path ends in `.gz`. It sleeps `poll_s` (10 ms) when the queue is
empty, flushes the file every second (a crash loses at most about a second), and
reports drops in the log at once (the first, from the caller) and then at most every
5 s ("never silent"). The thread shares the GIL with the event loop: its few
microseconds per frame (validate, format, write; zlib and file writes release the
GIL) are CPU the process spends, and while it holds the GIL a frame arriving on the
loop can wait for it (at worst CPython's switch interval, 5 ms; in practice the
thread works in short bursts between 10 ms sleeps).

The clock is ingest's own receive time, `time.time_ns()` (header `"clock":"time_ns"`):
wall-clock ns, so a recording can be lined up with exchange timestamps; replay only
uses differences.

The header needs the precisions, which arrive with the `instrument` snapshot after the
subscribe. The writer thread reads them from the `instrument` frames in the stream it
writes (no coupling to the session) and holds the first frames back until it knows the
precisions of every configured pair, or the first book frame arrives (ingest subscribes
a book only after its instrument data), or `header_timeout_s` (10 s) has passed since
the first frame, or the recorder closes. Then it writes the header with every
precision it knows (a missing one is logged; readers then fall back to the instrument
frames in the recording) and the held frames after it. So a recording replays
(`python -m replay --file`) and verifies (`python -m bookd.verify`) without
precision flags.

Rotation (`--record-max-bytes N`, `--record-rotate-s S`): with either, files are
numbered, `rec.ndjson.gz` -> `rec.0001.ndjson.gz`, `rec.0002.ndjson.gz`, ...
(continuing after the highest number already there, so a restart never overwrites);
without, PATH itself is written (and overwritten). A file rotates once it holds N
bytes on disk (compressed, for gzip; checked every N/16 bytes of lines, so a file ends
a little above N) or is S seconds old, at a frame boundary. Each file is a complete
recording with its own header (same symbols, depth, the latest precisions), and every
part after the first of a run names the part before it in the header's `continues`
(`"continues": "rec.0001.ndjson.gz"`). A rotated part starts mid-stream: its book
updates come before any snapshot of their pair (the next snapshot only comes with a
reconnect or resync). So give the parts together, in order: `python -m replay --file
rec.0001.ndjson.gz rec.0002.ndjson.gz ...` serves them as one recording, and
`python -m bookd.verify rec.0*.ndjson.gz` carries the books from a part into the one
that continues it. A part verified alone counts its updates before a snapshot as
`skipped` (not mismatches).

Close (`close()`, called by ingest's shutdown path, i.e. after SIGTERM): the thread
drains the queue for at most `timeout` seconds (frames still queued then are counted
as drops), writes the header if it was still waiting, and closes the file (gzip
trailer included), so a recording stopped by SIGTERM is complete. A write error
(disk full) is logged once; the recorder then drops and counts every frame, and ingest
keeps running.

Counters for ingest's StatsEvent (`counters()`): `recorded` (lines written),
`record_drops`, `record_raw` (raw_b64 lines), `record_bytes` (on disk), `record_files`,
`record_queue` (frames waiting now).
"""

from __future__ import annotations

import argparse
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ingest.wire import InstrumentMessage, WireError, decode_message, peek_channel
from replay.recording import RecordingWriter

__all__ = ["Recorder", "RecordError", "numbered", "add_record_options", "recorder_from_args",
           "main", "DEFAULT_QUEUE", "CLOCK"]

log = logging.getLogger("ingest.record")

DEFAULT_QUEUE = 100_000
CLOCK = "time_ns"
HEADER_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 5.0
FLUSH_S = 1.0
DROP_LOG_S = 5.0
POLL_S = 0.01
BATCH = 1024
PROGRESS_S = 10.0


class RecordError(Exception):
    """The recorder cannot start (a bad path or option); the message says why."""


def _split_name(path: Path) -> tuple[str, str]:
    """`rec.ndjson.gz` -> (`rec`, `.ndjson.gz`); `rec.gz` -> (`rec`, `.gz`)."""
    name = path.name
    gz = ".gz" if name.endswith(".gz") and len(name) > 3 else ""
    base = name[: len(name) - len(gz)]
    ext = Path(base).suffix if "." in base[1:] else ""
    return base[: len(base) - len(ext)], ext + gz


def numbered(path: Path, n: int) -> Path:
    """The n-th file of a rotating recording: `rec.ndjson.gz` -> `rec.0003.ndjson.gz`."""
    stem, ext = _split_name(path)
    return path.with_name(f"{stem}.{n:04d}{ext}")


def _next_number(path: Path) -> int:
    stem, ext = _split_name(path)
    pat = re.compile(re.escape(stem) + r"\.(\d{4,})" + re.escape(ext) + "$")
    nums = [int(m.group(1)) for p in path.parent.iterdir() if (m := pat.match(p.name))] \
        if path.parent.is_dir() else []
    return max(nums, default=0) + 1


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _instrument_precisions(frame: bytes) -> dict[str, tuple[int, int]]:
    try:
        msg = decode_message(frame)
    except WireError:
        return {}
    if type(msg) is not InstrumentMessage:
        return {}
    return {p.symbol: (p.price_precision, p.qty_precision) for p in msg.pairs}


class Recorder:
    """Frames in on the event loop (`rx`, `tx`), a recording out from a thread.

    `open_writer(path, *, symbols, depth, precisions, url, started_utc, clock, continues)`
    makes the writer of one file (default `RecordingWriter`; tests inject their own). It
    needs `write_frame(rx_ns, frame, tx=)`, `flush()`, `close()`, `size()`, and the
    counters `bytes`, `raw_frames`.
    """

    def __init__(self, path: str | Path, *, symbols: Sequence[str], depth: int,
                 url: str = "", max_bytes: int | None = None, rotate_s: float | None = None,
                 queue_size: int = DEFAULT_QUEUE, header_timeout_s: float = HEADER_TIMEOUT_S,
                 open_writer: Callable[..., Any] | None = None, poll_s: float = POLL_S,
                 flush_s: float = FLUSH_S) -> None:
        if queue_size < 1:
            raise RecordError(f"the record queue must hold at least 1 frame, got {queue_size}")
        if max_bytes is not None and max_bytes < 1:
            raise RecordError(f"--record-max-bytes must be >= 1, got {max_bytes}")
        if rotate_s is not None and not rotate_s > 0:
            raise RecordError(f"--record-rotate-s must be > 0, got {rotate_s}")
        self.path = Path(path)
        self.symbols = tuple(symbols)
        self.depth = depth
        self.url = url
        self.max_bytes = max_bytes
        self.rotate_s = rotate_s
        self.rotating = max_bytes is not None or rotate_s is not None
        self.queue_size = queue_size
        self.header_timeout_s = header_timeout_s
        self._open_writer = open_writer or RecordingWriter
        self._poll_s = poll_s
        self._flush_s = flush_s
        # hot path state (event loop thread only)
        self._q: deque[tuple[int, bytes, bool]] = deque()
        self._cap = queue_size
        self.drops = 0
        # writer thread state (read, never written, by the event loop)
        self.recorded = 0
        self.files: list[str] = []
        self.bytes = 0
        self.error: str | None = None
        self._late_drops = 0          # close deadline passed, or a write error
        self._raw_done = 0
        self._bytes_done = 0
        self._w: Any = None
        self._n = _next_number(self.path) if self.rotating else 0
        self._prec: dict[str, tuple[int, int]] = {}
        self._pending: list[tuple[int, bytes, bool]] | None = []  # None: header written
        self._first_t: float | None = None
        self._started_utc = _utc_now()
        self._rotate_at = 0.0
        self._size_check = 0
        self._drops_logged = 0
        self._drop_log_t = 0.0
        self._closing = threading.Event()
        self._deadline = float("inf")
        self._closed = False
        if open_writer is None:
            self._probe()
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._thread.start()

    # -- the hot path (event loop thread) ----------------------------------------------
    def rx(self, frame: bytes, rx_ns: int) -> None:
        """A frame received at `rx_ns`."""
        q = self._q
        if len(q) < self._cap:
            q.append((rx_ns, frame, False))
        else:
            self.drops += 1
            if self.drops == 1:
                self._first_drop()

    def tx(self, frame: bytes, rx_ns: int) -> None:
        """A frame the client sent at `rx_ns`."""
        q = self._q
        if len(q) < self._cap:
            q.append((rx_ns, frame, True))
        else:
            self.drops += 1
            if self.drops == 1:
                self._first_drop()

    def _first_drop(self) -> None:
        # Logged here, once: the writer thread may be the one that is stuck.
        if not self._closed:
            log.warning("recorder: queue full (--record-queue %d): dropping frames, "
                        "counted in record_drops (the writer thread cannot keep up)",
                        self.queue_size)

    # -- reporting ----------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        w = self._w
        return {"recorded": self.recorded, "record_drops": self.drops + self._late_drops,
                "record_raw": self._raw_done + (w.raw_frames if w is not None else 0),
                "record_bytes": self.bytes, "record_files": len(self.files),
                "record_queue": len(self._q)}

    def summary(self) -> str:
        c = self.counters()
        files = ", ".join(self.files) or "(none)"
        drops = (f"{c['record_drops']:,} DROPPED (queue full or unwritten)"
                 if c["record_drops"] else "0 dropped")
        err = f"; ERROR: {self.error}" if self.error else ""
        return (f"{c['recorded']:,} frames ({c['record_raw']:,} raw_b64), "
                f"{c['record_bytes']:,} bytes, {drops}, {len(self.files)} file(s): "
                f"{files}{err}")

    # -- shutdown -----------------------------------------------------------------------
    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Drain the queue for at most `timeout` s, then close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._cap = 0  # anything offered from now on is a counted drop
        self._deadline = time.monotonic() + timeout
        self._closing.set()
        self._thread.join(timeout + 2.0)
        if self._thread.is_alive():
            log.error("recorder: the writer did not finish within %.1f s; %s may be cut "
                      "short", timeout + 2.0, self.files[-1] if self.files else self.path)
        else:
            level = logging.WARNING if self.counters()["record_drops"] or self.error \
                else logging.INFO
            log.log(level, "recorder: closed: %s", self.summary())

    # -- the writer thread ---------------------------------------------------------------
    def _probe(self) -> None:
        first = numbered(self.path, self._n) if self.rotating else self.path
        try:
            open(first, "wb").close()  # noqa: SIM115 - fail now, not in the thread
        except OSError as e:
            raise RecordError(f"cannot write {first}: {e.strerror or e}") from None

    def _run(self) -> None:
        q = self._q
        last_flush = time.monotonic()
        try:
            while True:
                if q:
                    n = 0
                    while q and n < BATCH:
                        self._handle(q.popleft())
                        n += 1
                    if q and self._closing.is_set() and time.monotonic() >= self._deadline:
                        left = len(q)
                        q.clear()
                        self._late_drops += left
                        log.error("recorder: %d frames still queued at the close deadline: "
                                  "dropped", left)
                elif self._closing.is_set():
                    break
                else:
                    self._closing.wait(self._poll_s)
                now = time.monotonic()
                if self._pending is not None and self._first_t is not None \
                        and now - self._first_t >= self.header_timeout_s:
                    self._write_header("no instrument data for every pair after "
                                       f"{self.header_timeout_s:g} s")
                if self._w is not None and now - last_flush >= self._flush_s:
                    last_flush = now
                    self._guard(self._flush)
                if self.drops != self._drops_logged and now - self._drop_log_t >= DROP_LOG_S:
                    log.warning("recorder: queue full (--record-queue %d): %d frames "
                                "dropped since the last report, %d in all", self.queue_size,
                                self.drops - self._drops_logged, self.drops)
                    self._drops_logged = self.drops
                    self._drop_log_t = now
        except Exception as e:  # a bug: never take ingest down, say it loudly
            log.exception("recorder: the writer thread failed; from now on every frame is "
                          "dropped (counted in record_drops)")
            self.error = f"{type(e).__name__}: {e}"
            self._cap = 0
            self._late_drops += len(q)
            q.clear()
        finally:
            self._finish()

    def _handle(self, item: tuple[int, bytes, bool]) -> None:
        rx_ns, frame, tx = item
        pending = self._pending
        book = False
        if not tx and frame.startswith(b'{"channel":"'):
            ch = peek_channel(frame)
            if ch == "instrument":
                prec = _instrument_precisions(frame)
                self._prec.update((s, prec[s]) for s in self.symbols if s in prec)
            else:
                book = ch == "book"
        if pending is not None:
            if self.error is not None:
                self._late_drops += 1
                return
            pending.append(item)
            if self._first_t is None:
                self._first_t = time.monotonic()
            if book or len(self._prec) == len(self.symbols):
                self._write_header(None if len(self._prec) == len(self.symbols)
                                   else "a book frame came first")
            return
        self._write(rx_ns, frame, tx)

    def _write(self, rx_ns: int, frame: bytes, tx: bool) -> None:
        w = self._w
        if w is None:
            self._late_drops += 1
            return
        if self.rotating and (w.bytes >= self._size_check
                              or (self.rotate_s is not None
                                  and time.monotonic() >= self._rotate_at)):
            self._maybe_rotate()
            w = self._w
            if w is None:
                self._late_drops += 1
                return
        try:
            w.write_frame(rx_ns, frame, tx=tx)
        except OSError as e:
            self._fail(e)
            self._late_drops += 1
            return
        self.recorded += 1

    def _write_header(self, why_partial: str | None) -> None:
        missing = [s for s in self.symbols if s not in self._prec]
        if missing:
            log.warning("recorder: header written without precisions for %s (%s); "
                        "readers take them from instrument frames in the recording",
                        ", ".join(missing), why_partial)
        pending, self._pending = self._pending or [], None
        if not self._open(self._started_utc):
            self._late_drops += len(pending)
            return
        for rx_ns, frame, tx in pending:
            self._write(rx_ns, frame, tx)

    def _open(self, started_utc: str) -> bool:
        if self.rotating:
            path = numbered(self.path, self._n)
            self._n += 1
        else:
            path = self.path
        prec = {s: self._prec[s] for s in self.symbols if s in self._prec}
        # A rotated part names the one before it, so replay and verify can join them.
        prev = Path(self.files[-1]).name if self.files else None
        try:
            self._w = self._open_writer(path, symbols=self.symbols, depth=self.depth,
                                        precisions=prec, url=self.url,
                                        started_utc=started_utc, clock=CLOCK,
                                        continues=prev)
        except OSError as e:
            self._fail(e, path)
            return False
        self.files.append(str(path))
        self._rotate_at = time.monotonic() + (self.rotate_s or 0.0)
        self._size_check = self._next_check()
        if len(self.files) > 1:
            log.info("recorder: now writing %s", path)
        return True

    def _next_check(self) -> int:
        if self.max_bytes is None:
            return 1 << 62
        return self._w.bytes + max(1024, self.max_bytes // 16)

    def _maybe_rotate(self) -> None:
        w = self._w
        due = self.rotate_s is not None and time.monotonic() >= self._rotate_at
        if not due and self.max_bytes is not None:
            try:
                due = w.size() >= self.max_bytes
            except OSError as e:
                self._fail(e)
                return
        if not due:
            self._size_check = self._next_check()
            return
        if self._close_writer():
            self._open(_utc_now())

    def _close_writer(self) -> bool:
        w, self._w = self._w, None
        if w is None:
            return False
        try:
            w.close()
            size = w.size()
        except OSError as e:
            self._fail(e)
            return False
        finally:
            self._raw_done += w.raw_frames
        self._bytes_done += size
        self.bytes = self._bytes_done
        return True

    def _flush(self) -> None:
        w = self._w
        w.flush()
        self.bytes = self._bytes_done + w.size()

    def _guard(self, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except OSError as e:
            self._fail(e)

    def _fail(self, e: OSError, path: Path | str | None = None) -> None:
        where = path or (self.files[-1] if self.files else self.path)
        self.error = f"{where}: {e.strerror or e}"
        log.error("recorder: cannot write %s: %s; from now on every frame is dropped "
                  "(counted in record_drops)", where, e.strerror or e)
        w, self._w = self._w, None
        if w is not None:
            try:
                w.close()
            except OSError:
                pass
            self._raw_done += w.raw_frames

    def _finish(self) -> None:
        if self._pending is not None and self.error is None:
            self._write_header("closed before the instrument snapshot came")
        self._close_writer()


# --------------------------------------------------------------------------------------
# options and the standalone recorder

def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


def _positive_float(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return v


def add_record_options(ap: argparse.ArgumentParser) -> None:
    """The rotation and queue options shared by `python -m ingest` and this module."""
    ap.add_argument("--record-max-bytes", type=_positive_int, metavar="N",
                    help="rotate to a new numbered file once a file holds N bytes on disk")
    ap.add_argument("--record-rotate-s", type=_positive_float, metavar="S",
                    help="rotate to a new numbered file every S seconds")
    ap.add_argument("--record-queue", type=_positive_int, default=DEFAULT_QUEUE, metavar="N",
                    help=f"frames waiting for the writer thread before new ones are dropped "
                         f"(counted) (default {DEFAULT_QUEUE})")


def recorder_from_args(cfg: Any, url: str, path: str, args: argparse.Namespace) -> Recorder:
    """A Recorder for `cfg`'s pairs and depth writing to `path`. Raises RecordError."""
    return Recorder(path, symbols=cfg.trading.pairs, depth=cfg.data_ingestor.book_depth,
                    url=url, max_bytes=getattr(args, "record_max_bytes", None),
                    rotate_s=getattr(args, "record_rotate_s", None),
                    queue_size=getattr(args, "record_queue", DEFAULT_QUEUE))


async def _record(app: Any, rec: Recorder, duration: float | None) -> int:
    import asyncio

    loop = asyncio.get_running_loop()
    if duration is not None:
        loop.call_later(duration, app._stopping.set)

    async def progress() -> None:
        t0 = time.monotonic()
        while True:
            await asyncio.sleep(PROGRESS_S)
            c = rec.counters()
            log.info("recording: %.0f s, %d frames, %d bytes, %d dropped, queue %d, %s",
                     time.monotonic() - t0, c["recorded"], c["record_bytes"],
                     c["record_drops"], c["record_queue"],
                     rec.files[-1] if rec.files else "header not written yet")

    task = loop.create_task(progress())
    try:
        return await app.run()
    finally:
        task.cancel()


def main(argv: list[str] | None = None) -> int:
    import shutil
    import sys
    import tempfile

    import msgspec

    from ingest.config import exit_on_config_error

    ap = argparse.ArgumentParser(
        prog="python -m ingest.record",
        description="Record a Kraken v2 feed: run the ingest session for the configured "
                    "pairs and write every frame received (and sent) to a recording "
                    "(DESIGN.md section 3). Needs no bookd and no bus. Prints one summary "
                    "line on stdout at the end.")
    ap.add_argument("--config", help="config file (default: etc/krakenfeed.toml or "
                                     "$KRAKENFEED_CONFIG)")
    ap.add_argument("--out", required=True, metavar="PATH",
                    help="recording file (.ndjson, or .ndjson.gz for gzip)")
    ap.add_argument("--duration", type=_positive_float, metavar="S",
                    help="stop after S seconds (default: run until SIGTERM/SIGINT)")
    ap.add_argument("--url", help="WebSocket URL (default data_ingestor.kraken_ws_url; "
                                  "'replay' = the bundled replay server)")
    ap.add_argument("--ca-file", help="extra CA certificate (PEM) to trust for wss://")
    add_record_options(ap)
    args = ap.parse_args(argv)
    cfg = exit_on_config_error(args.config, "ingest.record")
    logging.basicConfig(level=cfg.system.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from ingest import app as ingest_app

    url = ingest_app.resolve_url(cfg, args.url)
    try:
        ssl_ctx = ingest_app._ssl_context(args.ca_file)
    except (OSError, ValueError) as e:
        log.error("cannot load --ca-file: %s", e)
        return 2
    # A private run directory: the session's sockets lead nowhere (frames for bookd and
    # the bus queue up to a small HWM, then count as drops) and never meet a running
    # system of the same namespace.
    run_dir = tempfile.mkdtemp(prefix="kfrec")
    own = msgspec.structs.replace(
        cfg, system=msgspec.structs.replace(cfg.system, run_dir=run_dir),
        ingest=msgspec.structs.replace(cfg.ingest, send_hwm=1000))
    try:
        rec = recorder_from_args(cfg, url, args.out, args)
    except RecordError as e:
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"ingest.record: {e}", file=sys.stderr)
        return 2
    log.info("recording %s from %s to %s%s", ", ".join(cfg.trading.pairs), url, args.out,
             f" for {args.duration:g} s" if args.duration else "")
    app = None
    try:
        app = ingest_app.IngestApp(own, url, ssl_context=ssl_ctx, recorder=rec)
        import uvloop
        uvloop.run(_record(app, rec, args.duration))
    finally:
        if app is not None:
            app.close()   # closes the recorder: drains the queue, closes the file
        rec.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"ingest.record: {rec.summary()}", flush=True)
    return 1 if rec.error or not rec.recorded else 0


if __name__ == "__main__":
    import sys

    from ingest.record import main as _main  # one module object, not __main__ and ingest.record

    sys.exit(_main())
