"""The real Kraken test vectors of ../shared/kraken/vectors, as verbatim frame bytes.

Two file formats (vectors/SOURCES.md):

* `*.jsonl`: an optional first line `{"_meta": {...}}` (symbol, depth, precisions),
  then one raw message per line.
* DepthCharge `*.ndjson`: a header line (symbol, depth, ...), then
  `{"rx_ns": .., ["dir": "tx",] "frame": <the WebSocket text frame spliced in verbatim>}`.
  The frame bytes are cut out of the line by slicing, never re-serialised through
  `json` (that would change number tokens such as `0.00005100`). `dir: "tx"` lines
  are what the client sent and are skipped.

Precisions come from `_meta` or, for files without them, from the table of SOURCES.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

VECTORS_DIR = Path(os.environ.get(
    "KRAKENFEED_VECTORS",
    Path(__file__).resolve().parents[2] / "shared" / "kraken" / "vectors"))

# (price_precision, qty_precision): vectors/SOURCES.md "Precision used".
KNOWN_PRECISIONS: dict[str, tuple[int, int]] = {
    "BTC/USD": (1, 8),
    "MINA/GBP": (4, 8),
    "MATIC/USD": (4, 8),
}

_FRAME_KEY = b'"frame":'


@dataclass(frozen=True)
class VectorFrame:
    """One received frame of a vector file."""

    file: str          # file name inside VECTORS_DIR
    line: int          # 1-based line number in that file
    frame: bytes       # the frame exactly as Kraken (or the docs) wrote it
    symbol: str | None  # the file's symbol (from _meta or the header line)
    depth: int | None   # the subscribed depth of the file
    precisions: dict[str, tuple[int, int]]  # symbol -> (price_precision, qty_precision)


def available() -> bool:
    return VECTORS_DIR.is_dir()


def vector_files() -> list[Path]:
    return sorted([*VECTORS_DIR.glob("*.jsonl"), *VECTORS_DIR.glob("*.ndjson")])


def _precisions(meta: dict) -> dict[str, tuple[int, int]]:
    out = dict(KNOWN_PRECISIONS)
    sym = meta.get("symbol")
    if sym and "price_precision" in meta and "qty_precision" in meta:
        out[sym] = (int(meta["price_precision"]), int(meta["qty_precision"]))
    return out


def slice_frame(line: bytes) -> bytes:
    """The verbatim `frame` value of a DepthCharge line (the last member of the object)."""
    i = line.index(_FRAME_KEY) + len(_FRAME_KEY)
    body = line.rstrip()
    if not body.endswith(b"}"):
        raise ValueError(f"not a DepthCharge frame line: {line[:60]!r}")
    return body[i:-1].strip()


def read_file(path: Path) -> tuple[dict, list[VectorFrame]]:
    """(meta, received frames) of one vector file."""
    raw_lines = path.read_bytes().splitlines()
    meta: dict = {}
    frames: list[VectorFrame] = []
    ndjson = path.suffix == ".ndjson"
    start = 0
    if raw_lines:
        first = json.loads(raw_lines[0])
        if ndjson and "frame" not in first:
            meta, start = first, 1
        elif not ndjson and "_meta" in first:
            meta, start = first["_meta"], 1
    precisions = _precisions(meta)
    symbol = meta.get("symbol")
    depth = meta.get("depth")
    for n, line in enumerate(raw_lines[start:], start + 1):
        if not line.strip():
            continue
        if ndjson:
            outer = json.loads(line)  # only to read rx_ns/dir; the frame is sliced
            if outer.get("dir") == "tx":
                continue
            frame = slice_frame(line)
            if json.loads(frame) != outer["frame"]:
                raise ValueError(f"{path.name}:{n}: sliced frame differs from the line")
        else:
            frame = line.strip()
        frames.append(VectorFrame(path.name, n, frame, symbol, depth, precisions))
    return meta, frames


def iter_frames() -> Iterator[VectorFrame]:
    """Every received frame of every vector file, in file order."""
    for path in vector_files():
        yield from read_file(path)[1]


def kind_of(frame: bytes) -> str:
    """`channel` or `method` of a frame, read with json (for classification only)."""
    obj = json.loads(frame)
    return obj.get("channel") or obj.get("method") or ("Error" if "Error" in obj else "?")
