"""A small reader for recordings, DepthCharge captures and files of bare Kraken messages.

Three line formats are accepted (DESIGN.md section 3, "Recording format";
`../shared/kraken/vectors/SOURCES.md`), plain or gzip (detected by its magic bytes, so a
`.gz` name is not required):

* **recording** (ours): header `{"format": "krakenfeed-recording", "version": 1,
  "symbols": [...], "depth": N, "precisions": {"BTC/USD": [1, 8]}, ...}`, then
  `{"rx_ns": <int>, ["dir": "tx",] "frame": <frame verbatim>}` lines and
  `{"rx_ns": <int>, "raw_b64": "..."}` lines for frames that were not JSON.
* **capture** (DepthCharge): the same lines under the capture tool's own header, which
  has `symbol` and `depth` (and a `subscribe` request) but no precisions.
* **messages**: one bare Kraken message per line, optionally under a
  `{"_meta": {"symbol":..., "depth":..., "price_precision":..., "qty_precision":...}}`
  line (the vector files). A file without any header is read as messages unless its
  first line is an `rx_ns` line (a headerless recording).

Frames are never re-serialized: the frame of a recording line is the text after
`"frame":` up to the line's final `}` (whitespace stripped), i.e. the bytes exactly as
they were spliced in. Each line is also decoded once with msgspec to prove it is one
JSON value; that decode hands back the frame's byte range as `msgspec.Raw` (a slice of
the line, not a re-encoding), which is used only when the `frame` key is not the last
one (a writer that put `"dir"` after it).

Errors are `RecFileError(path, line, message)`: missing or unreadable file, binary
content, invalid UTF-8, a line that is not one JSON value, a malformed header. The
caller turns them into one line on stderr. One exception, as in replay/recording.py: a
recorder that was killed leaves a last line cut short (no trailing newline) or a gzip
stream without its end; that tail is yielded as one `TRUNCATED` entry, not an error.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Iterator

import msgspec

__all__ = ["RecFileError", "FileHeader", "Entry", "LineReader", "read_file",
           "RX", "TX", "RAW", "MSG", "OTHER", "TRUNCATED"]

# Entry kinds
RX = "rx"        # a received frame of a recording or capture
TX = "tx"        # a frame the client sent ("dir": "tx")
RAW = "raw"      # a frame that was not JSON, kept as base64: count and skip
MSG = "msg"      # a bare Kraken message line (messages files)
OTHER = "other"  # a JSON line of a recording with neither frame nor raw_b64
TRUNCATED = "truncated"  # the cut-short tail of a killed recorder (last entry only)

_FRAME_KEY = b'"frame":'
_GZIP_MAGIC = b"\x1f\x8b"
_CAPTURE_KEYS = ("symbol", "symbols", "depth", "url", "captured_at", "venue")


class RecFileError(Exception):
    """Unreadable input: the message names the file and, when known, the line."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        where = f"{path}: line {line}" if line else path
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line


class FileHeader(msgspec.Struct, frozen=True):
    """What the first line of a file says (all optional)."""

    kind: str                               # "recording" | "capture" | "messages"
    symbols: tuple[str, ...] = ()
    depth: int | None = None
    # symbol -> (price_precision, qty_precision); either part may be unknown (None)
    precisions: dict[str, tuple[int | None, int | None]] = {}
    header_line: bool = False               # the first line was a header, not data
    continues: str | None = None            # a rotated part: the file name of the one before


class Entry(msgspec.Struct, frozen=True, gc=False):
    """One data line. `frame` is None for RAW and OTHER lines."""

    line: int
    kind: str
    frame: bytes | None
    rx_ns: int | None = None


class _Line(msgspec.Struct, gc=False):
    rx_ns: int | None = None
    dir: str | None = None
    frame: msgspec.Raw = msgspec.Raw()  # empty when absent
    raw_b64: str | None = None


_line_dec = msgspec.json.Decoder(_Line)
_raw_dec = msgspec.json.Decoder(msgspec.Raw)


class LineReader:
    """Binary lines of a plain or gzip file; `truncated` is set when a gzip stream ends
    early. Raises RecFileError when the file cannot be opened or read."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.truncated = False
        self.n = 0
        try:
            self._f = open(path, "rb")  # noqa: SIM115 - closed when iteration ends
        except OSError as e:
            raise RecFileError(path, None, f"cannot open: {e.strerror or e}") from None
        self._it = self._lines()

    def __iter__(self) -> Iterator[bytes]:
        return self._it

    def _lines(self) -> Iterator[bytes]:
        f = self._f
        try:
            stream: io.BufferedIOBase = f
            if f.peek(2)[:2] == _GZIP_MAGIC:
                stream = io.BufferedReader(gzip.GzipFile(fileobj=f, mode="rb"), 1 << 20)
            for line in stream:
                self.n += 1
                yield line
        except EOFError:  # gzip stream cut short: the recorder was killed
            self.truncated = True
        except (OSError, zlib.error) as e:
            raise RecFileError(self.path, self.n + 1,
                               f"unreadable ({type(e).__name__}: {e})") from None
        finally:
            f.close()


def _check_text(path: str, n: int, line: bytes) -> None:
    if not line.isascii():
        if b"\x00" in line:
            raise RecFileError(path, n, "binary data (NUL bytes): not an ndjson file")
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            raise RecFileError(path, n, "binary data (not UTF-8): not an ndjson file") from None
    elif b"\x00" in line:
        raise RecFileError(path, n, "binary data (NUL bytes): not an ndjson file")


def _json_error(path: str, n: int, e: Exception) -> RecFileError:
    return RecFileError(path, n, f"not one JSON value ({e})")


def _int_or_none(path: str, what: str, v: object) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise RecFileError(path, 1, f"header: {what} must be a non-negative integer, got {v!r}")
    return v


def _parse_header(path: str, obj: object) -> FileHeader | None:
    """FileHeader when `obj` (the decoded first line) is a header, else None."""
    if not isinstance(obj, dict):
        return None
    if "_meta" in obj:
        meta = obj["_meta"]
        if not isinstance(meta, dict):
            raise RecFileError(path, 1, "header: _meta must be an object")
        pp = _int_or_none(path, "_meta.price_precision", meta.get("price_precision"))
        qp = _int_or_none(path, "_meta.qty_precision", meta.get("qty_precision"))
        syms = _symbols(path, meta)
        precs = {s: (pp, qp) for s in syms} if pp is not None or qp is not None else {}
        if not syms and (pp is not None or qp is not None):
            precs = {"*": (pp, qp)}  # applies to every symbol of the file
        return FileHeader("messages", syms, _int_or_none(path, "_meta.depth", meta.get("depth")),
                          precs, True)
    if obj.get("format") == "krakenfeed-recording":
        raw = obj.get("precisions") or {}
        if not isinstance(raw, dict):
            raise RecFileError(path, 1, "header: precisions must be an object")
        precs: dict[str, tuple[int | None, int | None]] = {}
        for sym, pq in raw.items():
            if (not isinstance(pq, list) or len(pq) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                               for x in pq)):
                raise RecFileError(path, 1, f"header: precisions[{sym!r}] must be "
                                            "[price_precision, qty_precision]")
            precs[sym] = (pq[0], pq[1])
        continues = obj.get("continues")
        if continues is not None and not isinstance(continues, str):
            raise RecFileError(path, 1, "header: continues must be the file name of the "
                                        "previous part")
        return FileHeader("recording", _symbols(path, obj),
                          _int_or_none(path, "depth", obj.get("depth")), precs, True,
                          continues)
    if ("rx_ns" in obj or "channel" in obj or "method" in obj or "frame" in obj
            or "raw_b64" in obj):
        return None
    if any(k in obj for k in _CAPTURE_KEYS):
        return FileHeader("capture", _symbols(path, obj),
                          _int_or_none(path, "depth", obj.get("depth")), {}, True)
    return None


def _symbols(path: str, obj: dict) -> tuple[str, ...]:
    syms = obj.get("symbols")
    if syms is None:
        one = obj.get("symbol")
        syms = [] if one is None else [one]
    if not isinstance(syms, list) or not all(isinstance(s, str) for s in syms):
        raise RecFileError(path, 1, "header: symbol(s) must be a string or a list of strings")
    return tuple(syms)


def read_file(path: str) -> tuple[FileHeader, Iterator[Entry]]:
    """Open `path`, read its first line, and return the header and the data entries.

    The header is read eagerly (so a missing or binary file fails here); entries are
    produced lazily and may raise RecFileError at any line.
    """
    lines = LineReader(path)
    first: bytes | None = None
    n = 0
    for n, line in enumerate(lines, 1):  # noqa: B007 - skip leading blank lines
        _check_text(path, n, line)
        if line.strip():
            first = line
            break
    if first is None:
        return FileHeader("messages"), iter(())
    try:
        obj = msgspec.json.decode(first)
    except msgspec.DecodeError as e:
        if not first.endswith(b"\n"):  # a one-line file cut short
            return FileHeader("messages"), iter((Entry(n, TRUNCATED, None),))
        raise _json_error(path, n, e) from None
    header = _parse_header(path, obj)
    if header is not None:
        recording = header.kind != "messages"
        return header, _entries(path, lines, n, None, recording)
    recording = isinstance(obj, dict) and "rx_ns" in obj
    return (FileHeader("recording" if recording else "messages"),
            _entries(path, lines, n - 1, first, recording))


def _entries(path: str, lines: LineReader, n: int, first: bytes | None,
             recording: bool) -> Iterator[Entry]:
    parse = _recording_entry if recording else _message_entry
    if first is not None:
        n += 1
        yield parse(path, n, first)
    for line in lines:
        n += 1
        if not line.isascii() or b"\x00" in line:
            _check_text(path, n, line)
        if line.isspace() or not line:
            continue
        try:
            yield parse(path, n, line)
        except RecFileError:
            if line.endswith(b"\n"):
                raise
            yield Entry(n, TRUNCATED, None)  # the last line, cut short
            return
    if lines.truncated:
        yield Entry(n + 1, TRUNCATED, None)


def _message_entry(path: str, n: int, line: bytes) -> Entry:
    try:
        raw = _raw_dec.decode(line)
    except msgspec.DecodeError as e:
        raise _json_error(path, n, e) from None
    return Entry(n, MSG, bytes(raw))


def _recording_entry(path: str, n: int, line: bytes) -> Entry:
    try:
        env = _line_dec.decode(line)
    except msgspec.ValidationError as e:
        raise RecFileError(path, n, f"not a recording line ({e})") from None
    except msgspec.DecodeError as e:
        raise _json_error(path, n, e) from None
    raw = env.frame
    if not len(raw):
        if env.raw_b64 is not None:
            return Entry(n, RAW, None, env.rx_ns)
        return Entry(n, OTHER, None, env.rx_ns)
    i = line.find(_FRAME_KEY)
    frame = line[i + len(_FRAME_KEY):line.rfind(b"}")].strip()
    if len(frame) != len(raw):  # `frame` was not the last key: take the value's own bytes
        frame = bytes(raw)
    return Entry(n, TX if env.dir == "tx" else RX, frame, env.rx_ns)
