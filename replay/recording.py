"""The recording format (DESIGN.md section 3): reader and writer.

A recording is ndjson, optionally gzip (a `.gz` name, or gzip magic on read):

* line 1, the header: ours,
  `{"format":"krakenfeed-recording","version":1,"url":...,"symbols":[...],"depth":N,
  "precisions":{"BTC/USD":[1,8]},"clock":"perf_counter_ns","started_utc":...}`,
  or a DepthCharge capture's (`kraken/vectors/depthcharge_*.ndjson`: it has `symbol`
  and `depth` but no precisions);
* then one line per WebSocket frame: `{"rx_ns":<int>,"frame":<frame spliced in
  verbatim>}`, with `"dir":"tx"` on frames the client sent, or
  `{"rx_ns":<int>,"raw_b64":"..."}` for a frame that was not one JSON value (garbage,
  binary, truncated).

Frame bytes are never re-serialized: the reader decodes each line with the frame as a
`msgspec.Raw`, which is the slice of the line holding the frame, byte for byte, so
number tokens (`0.00000000`, `1e-08`, big ints) survive; the writer splices the frame
bytes into the line. Readers skip and count `raw_b64` lines and client-sent lines; a
blank line is ignored; a final line cut short by a recorder that was killed (no
trailing newline, or a truncated gzip stream) is counted as `truncated_tail` and
skipped. Any other line that is not a recording line is a `RecordingError` naming the
file and line number.
"""

from __future__ import annotations

import base64
import gzip
import io
import time
import zlib
from bisect import bisect_right
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import msgspec
from msgspec import Raw, Struct

from ingest.wire import peek_channel

__all__ = ["RecordingError", "RecordedFrame", "RecordLine", "Recording", "read_recording",
           "read_recordings", "iter_lines", "RecordingWriter", "FORMAT", "VERSION"]

FORMAT = "krakenfeed-recording"
VERSION = 1
_GZIP_MAGIC = b"\x1f\x8b"


class RecordingError(ValueError):
    """A recording that cannot be read; the message names the file and line."""


class RecordLine(Struct, frozen=True, gc=False):
    """One frame line as read: `frame` (verbatim) or `raw` (decoded base64), never both."""

    line: int
    rx_ns: int
    tx: bool
    frame: bytes | None
    raw: bytes | None


class RecordedFrame(Struct, frozen=True, gc=False):
    """A server-sent frame that is one JSON value, with its channel peeked ("" if none)."""

    line: int
    rx_ns: int
    channel: str
    frame: bytes


class _Line(Struct, gc=False):
    rx_ns: int
    frame: Raw = Raw(b"")
    raw_b64: str | None = None
    dir: str | None = None


class _Env(Struct):
    channel: str | None = None


_line_dec = msgspec.json.Decoder(_Line)
_raw_dec = msgspec.json.Decoder(Raw)  # the writer's one-JSON-value check
_env_dec = msgspec.json.Decoder(_Env)


class Recording:
    """A whole recording in memory: header fields plus the server-sent frames."""

    def __init__(self, path: str, kind: str, header: dict, symbols: tuple[str, ...],
                 depth: int | None, precisions: dict[str, tuple[int, int]]) -> None:
        self.path = path
        self.kind = kind                  # "krakenfeed" or "depthcharge"
        self.header = header
        self.url: str = str(header.get("url") or "")
        self.started_utc = header.get("started_utc") or header.get("captured_at")
        self.symbols = symbols
        self.depth = depth
        self.precisions = precisions
        # A rotated part names the part before it (the recorder's `continues`).
        self.continues: str | None = header.get("continues")
        self.parts: list[str] = [path]
        self.part_starts: list[int] = [0]  # index in `frames` of each part's first frame
        self.frames: list[RecordedFrame] = []
        self.skipped_raw = 0
        self.skipped_tx = 0
        self.truncated_tail = 0

    def file_of(self, i: int) -> str:
        """The part (file) that holds `frames[i]` (its `line` counts within that file)."""
        return self.parts[bisect_right(self.part_starts, i) - 1]

    def __repr__(self) -> str:
        return (f"Recording({self.path!r}, {self.kind}, symbols={self.symbols}, "
                f"depth={self.depth}, frames={len(self.frames)})")


def _open(path: Path) -> IO[bytes]:
    try:
        f = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    except OSError as e:
        raise RecordingError(f"{path}: cannot open: {e.strerror or e}") from None
    magic = f.read(2)
    f.seek(0)
    if magic == _GZIP_MAGIC:
        f.close()
        return gzip.GzipFile(path, "rb")  # type: ignore[return-value]
    return f


def _parse_header(path: Path, line: bytes) -> tuple[str, dict, tuple[str, ...], int | None,
                                                   dict[str, tuple[int, int]]]:
    def bad(msg: str) -> RecordingError:
        return RecordingError(f"{path}:1: {msg}")

    try:
        header = msgspec.json.decode(line)
    except msgspec.DecodeError as e:
        raise bad(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    depth = header.get("depth")
    if depth is not None and (not isinstance(depth, int) or isinstance(depth, bool) or depth < 1):
        raise bad(f"header depth must be a positive integer, got {depth!r}")
    if header.get("format") == FORMAT:
        if not isinstance(header.get("continues", ""), str):
            raise bad("header continues must be the file name of the previous part")
        if header.get("version") != VERSION:
            raise bad(f"unsupported {FORMAT} version {header.get('version')!r} "
                      f"(this reader knows {VERSION})")
        symbols = header.get("symbols")
        if not isinstance(symbols, list) or not all(isinstance(s, str) for s in symbols):
            raise bad("header symbols must be a list of strings")
        raw_prec = header.get("precisions") or {}
        if not isinstance(raw_prec, dict):
            raise bad("header precisions must be an object {symbol: [price, qty]}")
        precisions: dict[str, tuple[int, int]] = {}
        for sym, pq in raw_prec.items():
            if (not isinstance(pq, list) or len(pq) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                               for x in pq)):
                raise bad(f"header precisions for {sym} must be [price, qty] integers")
            precisions[sym] = (pq[0], pq[1])
        return "krakenfeed", header, tuple(symbols), depth, precisions
    if "symbol" in header and "depth" in header:
        sym = header["symbol"]
        if not isinstance(sym, str):
            raise bad("header symbol must be a string")
        return "depthcharge", header, (sym,), depth, {}
    raise bad(f"not a recording header (expected \"format\": \"{FORMAT}\" or a DepthCharge "
              "header with symbol and depth)")


def _read_header(path: Path, f: IO[bytes]) -> tuple[Recording, int]:
    lineno = 0
    try:
        for raw in f:
            lineno += 1
            if raw.strip():
                kind, header, symbols, depth, prec = _parse_header(path, raw.strip())
                return Recording(str(path), kind, header, symbols, depth, prec), lineno
    except (OSError, EOFError, zlib.error) as e:
        raise RecordingError(f"{path}:{lineno + 1}: cannot read: {e}") from None
    raise RecordingError(f"{path}: empty file, no header")


def iter_lines(path: str | Path) -> tuple[Recording, Iterator[RecordLine]]:
    """Open a recording: its header (frames not loaded) and an iterator of its lines.

    The iterator raises RecordingError on a corrupt line and counts skipped tails on
    the returned Recording. Close happens when the iterator is exhausted or collected.
    """
    p = Path(path)
    f = _open(p)
    try:
        rec, lineno = _read_header(p, f)
    except BaseException:
        f.close()
        raise
    return rec, _lines(p, f, rec, lineno)


def _lines(p: Path, f: IO[bytes], rec: Recording, lineno: int) -> Iterator[RecordLine]:
    with f:
        while True:
            try:
                raw = f.readline()
            except EOFError:          # gzip stream cut short: the recorder was killed
                rec.truncated_tail += 1
                return
            except (OSError, zlib.error) as e:
                raise RecordingError(f"{p}:{lineno + 1}: cannot read: {e}") from None
            if not raw:
                return
            lineno += 1
            body = raw.strip()
            if not body:
                continue
            try:
                ln = _line_dec.decode(body)
            except msgspec.DecodeError as e:
                if not raw.endswith(b"\n"):  # the last line, cut short: skip and count
                    rec.truncated_tail += 1
                    return
                raise RecordingError(f"{p}:{lineno}: not a recording line ({e})") from None
            if ln.dir not in (None, "tx", "rx"):
                raise RecordingError(f"{p}:{lineno}: unknown dir {ln.dir!r} (tx or rx)")
            if ln.raw_b64 is not None:
                try:
                    data = base64.b64decode(ln.raw_b64, validate=True)
                except ValueError:
                    raise RecordingError(f"{p}:{lineno}: raw_b64 is not base64") from None
                yield RecordLine(lineno, ln.rx_ns, ln.dir == "tx", None, data)
                continue
            frame = bytes(ln.frame)
            if not frame:
                raise RecordingError(f"{p}:{lineno}: line has neither frame nor raw_b64")
            yield RecordLine(lineno, ln.rx_ns, ln.dir == "tx", frame, None)


def _channel(frame: bytes) -> str:
    ch = peek_channel(frame)
    if ch is not None:
        return ch
    if b'"channel"' not in frame:
        return ""
    try:
        return _env_dec.decode(frame).channel or ""
    except msgspec.DecodeError:
        return ""


def read_recording(path: str | Path) -> Recording:
    """Read a whole recording: header fields plus every server-sent JSON frame."""
    rec, lines = iter_lines(path)
    frames = rec.frames
    for ln in lines:
        if ln.frame is None:
            rec.skipped_raw += 1
        elif ln.tx:
            rec.skipped_tx += 1
        else:
            frames.append(RecordedFrame(ln.line, ln.rx_ns, _channel(ln.frame), ln.frame))
    return rec


def read_recordings(paths: Sequence[str | Path]) -> Recording:
    """Read one recording, or the rotated parts of one, in order, as one recording.

    Each part after the first must name the part given before it in its header's
    `continues` (the recorder writes it when it rotates), so books carry over from one
    part to the next and nothing unrelated is joined. The result has the first part's
    path and header, every part's symbols, and each symbol's latest precisions; frames
    keep their line numbers within their own part (`parts` lists the files).
    """
    if not paths:
        raise RecordingError("no recording given")
    rec = read_recording(paths[0])
    for path in paths[1:]:
        part = read_recording(path)
        prev = Path(rec.parts[-1]).name
        if part.continues != prev:
            says = (f"its header says it continues {part.continues}" if part.continues
                    else "it is not a rotated part (its header has no continues)")
            raise RecordingError(f"{path}: not the part after {prev}: {says}; give the "
                                 "parts of one rotated recording, in order")
        if part.depth != rec.depth:
            raise RecordingError(f"{path}: depth {part.depth} differs from {rec.depth} of "
                                 f"{rec.parts[0]}")
        rec.symbols += tuple(s for s in part.symbols if s not in rec.symbols)
        rec.precisions.update(part.precisions)
        rec.part_starts.append(len(rec.frames))
        rec.frames.extend(part.frames)
        rec.skipped_raw += part.skipped_raw
        rec.skipped_tx += part.skipped_tx
        rec.truncated_tail += part.truncated_tail
        rec.parts.append(str(path))
    return rec


# --------------------------------------------------------------------------------------
# writer

def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class RecordingWriter:
    """Writes a recording: the header at once, then one line per frame.

    `path` ending in `.gz` (or `compress=True`) writes gzip. Frames are spliced in
    verbatim; a frame that is not exactly one JSON value (or `binary=True`) is written as
    `raw_b64`. A raw newline in a frame can only be whitespace between JSON tokens (JSON
    strings escape them), so it is replaced by a space to keep one frame per line.
    Call `flush()` to push buffered lines to the file and `close()` at the end (or use
    it as a context manager). `bytes` counts the (uncompressed) bytes of every line
    written, header included, without a system call; `size()` is the file's size on
    disk so far (compressed for gzip; one `tell`, so call it now and then, not per frame).
    """

    def __init__(self, path: str | Path, *, symbols: Sequence[str], depth: int,
                 precisions: Mapping[str, tuple[int, int]], url: str = "",
                 started_utc: str | None = None, compress: bool | None = None,
                 clock: str = "perf_counter_ns", continues: str | None = None) -> None:
        self.path = Path(path)
        gz = self.path.suffix == ".gz" if compress is None else compress
        raw = open(self.path, "wb", buffering=1 << 16)  # noqa: SIM115 - closed in close()
        self._raw = raw
        # gzip: lines are gathered into 128 KiB writes (a GzipFile.write per line costs
        # a zlib call per line, several times the rest of the work per frame).
        self._gz = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=5) if gz else None
        self._f: IO[bytes] = (io.BufferedWriter(self._gz, 1 << 17)  # type: ignore[arg-type, assignment]
                              if self._gz is not None else raw)
        self.frames = 0
        self.raw_frames = 0
        header = {
            "format": FORMAT, "version": VERSION, "url": url, "symbols": list(symbols),
            "depth": depth,
            "precisions": {s: [int(p), int(q)] for s, (p, q) in precisions.items()},
            "clock": clock, "started_utc": started_utc or _utc_now(),
        }
        if continues is not None:  # a rotated part: the file name of the part before it
            header["continues"] = continues
        line = msgspec.json.encode(header) + b"\n"
        self._f.write(line)
        self.bytes = len(line)

    def write_frame(self, rx_ns: int, frame: bytes, *, tx: bool = False,
                    binary: bool = False) -> None:
        """Append one frame received (or, with tx=True, sent) at `rx_ns`."""
        if not binary:
            try:
                _raw_dec.decode(frame)
                valid = True
            except msgspec.DecodeError:
                valid = False
            if valid:
                if b"\n" in frame or b"\r" in frame:
                    frame = frame.replace(b"\n", b" ").replace(b"\r", b" ")
                head = b'{"rx_ns":%d,"dir":"tx","frame":' if tx else b'{"rx_ns":%d,"frame":'
                line = head % rx_ns + frame + b"}\n"
                self._f.write(line)
                self.bytes += len(line)
                self.frames += 1
                return
        self.write_raw(rx_ns, frame, tx=tx)

    def write_raw(self, rx_ns: int, data: bytes, *, tx: bool = False) -> None:
        """Append a frame that is not one JSON value, as base64."""
        b64 = base64.b64encode(bytes(data))
        head = b'{"rx_ns":%d,"dir":"tx","raw_b64":"' if tx else b'{"rx_ns":%d,"raw_b64":"'
        line = head % rx_ns + b64 + b'"}\n'
        self._f.write(line)
        self.bytes += len(line)
        self.raw_frames += 1

    def size(self) -> int:
        """Bytes in the file so far (gzip: compressed output, whatever zlib still holds
        not counted); the file's final size once closed."""
        if self._raw.closed:
            return self.path.stat().st_size
        return self._raw.tell()

    def flush(self) -> None:
        if self._gz is not None:
            self._f.flush()
            self._gz.flush()
        self._raw.flush()

    def close(self) -> None:
        if not self._raw.closed:
            try:
                if self._f is not self._raw:
                    self._f.close()   # closes the GzipFile too: its trailer goes out
            finally:
                self._raw.close()

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def now_rx_ns() -> int:
    """The recording clock (`perf_counter_ns`)."""
    return time.perf_counter_ns()
