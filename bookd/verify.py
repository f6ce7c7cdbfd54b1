"""Offline checksum verifier: `python -m bookd.verify FILE [FILE ...]`.

Replays every book message of recordings, DepthCharge captures and files of bare
Kraken messages (plain or gzip; formats in `bookd/recfile.py`) through the real decoder
(`ingest.wire.decode_book`) and the one book core (`bookd.book.Book`), and compares the
checksum of every message with Kraken's. Values of any size are handled: the decoder's
exact route takes tokens of any length and the book never range-checks.

Where the parameters come from, per symbol (first that knows wins):

* precision: `--precision SYMBOL=P/Q` (that symbol, all files), then
  `--price-precision` / `--qty-precision` (every symbol, all files), then the file's
  `_meta` or recording header, then `instrument` frames in the stream. A symbol whose
  precision is still unknown at its first book message is an input error (exit 2)
  naming the symbol and the flags to pass. `--precision` lets files of different
  instruments be checked in one run (the DepthCharge MINA/GBP capture has no
  precisions; the BTC/USD vectors bring theirs in `_meta`).
* depth: `--depth`, then `_meta` or the header, then the client's subscribe request
  (`"dir":"tx"` line) or the subscribe ack, else 10.

Files are separate connections with their own books, except the rotated parts of one
recording: a part whose header says it `continues` the file given just before it
carries on with that file's books and precisions (`bookd.verify rec.0*.ndjson.gz`);
a part given without its predecessor starts fresh, with a NOTE saying so.

Stream semantics: a snapshot (re)creates the symbol's book, so resubscribes and new
snapshots mid-file just work; a successful book unsubscribe ack drops the book; an
update with no book (no snapshot yet, or after an unsubscribe) is counted as
`skipped`. An `instrument` frame that changes a symbol's precision (when neither flags
nor header fixed it) also drops the book until the next snapshot. Other channels,
`"dir":"tx"` lines and `raw_b64` lines are counted and skipped.

After a mismatch the verifier keeps checking against the book as applied. So a
message whose checksum field alone was corrupted (the book is right) shows up as
exactly one mismatch, while a book that really went wrong (a lost or altered level)
mismatches on every following message whose top 10 is affected, until the next
snapshot replaces it: each wrong message counts.

A crossed book after a message (`CrossedBook`) is an integrity problem: it is counted
per symbol and reported (the checksum of that message is still compared). Book frames
that cannot be decoded (a token with more decimals than the precision, a missing
field) are counted as `bad_frames` and listed under `errors`. A last line cut short by a
killed recorder (no trailing newline, or a gzip stream without its end) is skipped and
counted as `truncated_tail` (as replay/recording.py does), not an input error.

Output: a readable summary on stdout, then, as the very last line of all output, one
JSON object for all FILEs together (`frames` counts every line that carries a frame,
client-sent `tx` lines included; `tx` says how many of them there were).

Exit status: 0 when at least one checksum was checked and every one matched, with no
crossed book and no undecodable book frame; 1 otherwise; 2 on unreadable input (missing
file, binary data, a line that is not one JSON value, unknown precision) with one line
on stderr naming the file and line and nothing on stdout.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import msgspec

from bookd.book import Book, CrossedBook
from bookd.recfile import MSG, RAW, RX, TRUNCATED, TX, FileHeader, RecFileError, read_file
from ingest.wire import Ack, InstrumentMessage, WireError, decode_book, decode_message, peek_channel

__all__ = ["Verifier", "SymbolStats", "main"]

MAX_LISTED = 20
DEFAULT_DEPTH = 10
_PROGRESS_LINES = 1_000_000
_PROGRESS_S = 5.0
_SYMBOL_RE = re.compile(rb'"symbol"\s*:\s*"([^"]*)"')


class SymbolStats:
    __slots__ = ("checksums", "ok", "mismatch", "crossed", "skipped", "snapshots",
                 "bad_frames", "depth", "price_precision", "qty_precision")

    def __init__(self) -> None:
        self.checksums = self.ok = self.mismatch = self.crossed = 0
        self.skipped = self.snapshots = self.bad_frames = 0
        self.depth: int | None = None
        self.price_precision: int | None = None
        self.qty_precision: int | None = None

    def as_dict(self) -> dict:
        return {"checksums": self.checksums, "ok": self.ok, "mismatch": self.mismatch,
                "depth": self.depth, "price_precision": self.price_precision,
                "qty_precision": self.qty_precision, "crossed": self.crossed,
                "skipped": self.skipped, "snapshots": self.snapshots,
                "bad_frames": self.bad_frames}


class _TxParams(msgspec.Struct):
    channel: str = ""
    symbol: list[str] = []
    depth: int | None = None


class _TxRequest(msgspec.Struct):
    method: str = ""
    params: _TxParams | None = None


_tx_dec = msgspec.json.Decoder(_TxRequest)


class _FileState:
    """Per-file context: a new file is a new connection with its own books."""

    def __init__(self, path: str, header: FileHeader) -> None:
        self.path = path
        self.header = header
        self.prec: dict[str, tuple[int, int]] = {}       # resolved, what decode_book sees
        self.instr: dict[str, tuple[int, int]] = {}      # from instrument frames
        self.sub_depth: dict[str, int] = {}              # from tx subscribe requests / acks
        self.books: dict[str, Book] = {}


class Verifier:
    """Accumulates results over any number of files (one report for all)."""

    def __init__(self, depth: int | None = None, price_precision: int | None = None,
                 qty_precision: int | None = None, progress: bool = True,
                 precisions: dict[str, tuple[int, int]] | None = None) -> None:
        self.flag_depth = depth
        self.flag_pp = price_precision
        self.flag_qp = qty_precision
        self.flag_prec = dict(precisions or {})
        self.progress = progress
        self.symbols: dict[str, SymbolStats] = {}
        self.channels: dict[str, int] = {}
        self.files: list[dict] = []
        self.mismatches: list[dict] = []
        self.crossed: list[dict] = []
        self.errors: list[dict] = []
        self.lines = self.frames = self.tx = self.raw = self.other_lines = 0
        self.checksums = self.ok = self.mismatch = self.crossed_n = self.skipped = 0
        self.bad_frames = self.truncated = 0
        self._t0 = time.monotonic()
        self._last_progress = self._t0
        self._last_progress_lines = 0
        self._last: _FileState | None = None  # the file before, for a rotated part

    # -- parameter resolution ---------------------------------------------------------
    def _resolve_precision(self, st: _FileState, sym: str, line: int) -> tuple[int, int]:
        fp = self.flag_prec.get(sym, (None, None))
        hp = st.header.precisions.get(sym) or st.header.precisions.get("*") or (None, None)
        ip = st.instr.get(sym, (None, None))
        pp = next((v for v in (fp[0], self.flag_pp, hp[0], ip[0]) if v is not None), None)
        qp = next((v for v in (fp[1], self.flag_qp, hp[1], ip[1]) if v is not None), None)
        if pp is None or qp is None:
            missing = " ".join(f for f, v in (("--price-precision P", pp),
                                               ("--qty-precision Q", qp)) if v is None)
            raise RecFileError(st.path, line, f"no precision known for symbol {sym!r} at its "
                                              f"first book message; pass {missing} (or "
                                              f"--precision {sym}=P/Q); the file has no header "
                                              "precisions and no instrument frame")
        st.prec[sym] = (pp, qp)
        return pp, qp

    def _depth(self, st: _FileState, sym: str) -> int:
        for d in (self.flag_depth, st.header.depth, st.sub_depth.get(sym)):
            if d is not None:
                return d
        return DEFAULT_DEPTH

    def _stats(self, sym: str) -> SymbolStats:
        s = self.symbols.get(sym)
        if s is None:
            s = self.symbols[sym] = SymbolStats()
        return s

    # -- one file ------------------------------------------------------------------
    def run_file(self, path: str) -> None:
        header, entries = read_file(path)
        prev = self._last
        joined = (header.continues is not None and prev is not None
                  and os.path.basename(prev.path) == header.continues)
        if joined:  # the next rotated part of the same connection: its books go on
            st = prev
            st.path, st.header = path, header
        else:
            st = _FileState(path, header)
            if header.continues is not None:
                self.errors.append({
                    "kind": "part", "file": path, "line": 1, "symbol": None,
                    "error": f"a rotated part that continues {header.continues}, which was "
                             "not the file before it: its books start fresh (give the "
                             "parts in order to carry them over)"})
        self._last = st
        before = (self.lines, self.frames, self.checksums, self.ok, self.mismatch)
        last_line = 1 if header.header_line else 0
        for e in entries:
            last_line = e.line
            kind = e.kind
            if kind == RX or kind == MSG:
                self.frames += 1
                self._frame(st, e.line, e.frame)
            elif kind == TX:
                self.frames += 1
                self.tx += 1
                self._tx(st, e.frame)
            elif kind == RAW:
                self.raw += 1
            elif kind == TRUNCATED:
                self.truncated += 1
                if len(self.errors) < MAX_LISTED:
                    self.errors.append({"kind": "truncated_tail", "file": path,
                                        "line": e.line, "symbol": None,
                                        "error": "last line cut short (killed recorder?): "
                                                 "skipped"})
            else:
                self.other_lines += 1
            if self.progress and not e.line & 4095:
                self._maybe_progress(path, e.line)
        self.lines += last_line
        self.files.append({
            "file": path, "kind": header.kind, "lines": self.lines - before[0],
            "frames": self.frames - before[1], "checksums": self.checksums - before[2],
            "ok": self.ok - before[3], "mismatch": self.mismatch - before[4],
            "symbols": sorted({*st.prec}), "continues": header.continues if joined else None})

    def _maybe_progress(self, path: str, line: int) -> None:
        now = time.monotonic()
        total = self.lines + line
        if (total - self._last_progress_lines >= _PROGRESS_LINES
                or now - self._last_progress >= _PROGRESS_S):
            rate = total / max(now - self._t0, 1e-9)
            print(f"bookd.verify: {path}: line {line:,}, {self.checksums:,} checksums, "
                  f"{self.mismatch:,} mismatches ({rate:,.0f} lines/s)",
                  file=sys.stderr, flush=True)
            self._last_progress = now
            self._last_progress_lines = total

    def _tx(self, st: _FileState, frame: bytes) -> None:
        try:
            req = _tx_dec.decode(frame)
        except msgspec.DecodeError:
            return
        p = req.params
        if req.method == "subscribe" and p is not None and p.channel == "book":
            for sym in p.symbol:
                st.sub_depth[sym] = p.depth if p.depth is not None else DEFAULT_DEPTH

    def _frame(self, st: _FileState, line: int, frame: bytes) -> None:
        ch = peek_channel(frame)
        if ch == "book":
            self.channels["book"] = self.channels.get("book", 0) + 1
            self._book(st, line, frame)
            return
        if ch is not None and ch != "instrument":
            self.channels[ch] = self.channels.get(ch, 0) + 1
            return
        try:
            msg = decode_message(frame)
        except WireError:
            self.channels["undecodable"] = self.channels.get("undecodable", 0) + 1
            return
        if isinstance(msg, Ack):
            self.channels[f"ack:{msg.method}"] = self.channels.get(f"ack:{msg.method}", 0) + 1
            self._ack(st, msg)
        elif isinstance(msg, InstrumentMessage):
            self.channels["instrument"] = self.channels.get("instrument", 0) + 1
            self._instrument(st, msg)
        else:
            name = ch or type(msg).__name__.lower()
            self.channels[name] = self.channels.get(name, 0) + 1

    def _ack(self, st: _FileState, ack: Ack) -> None:
        r = ack.result
        if not ack.success or r is None or r.channel != "book" or r.symbol is None:
            return
        if ack.method == "subscribe" and r.depth is not None:
            st.sub_depth[r.symbol] = r.depth
        elif ack.method == "unsubscribe":
            st.books.pop(r.symbol, None)

    def _instrument(self, st: _FileState, msg: InstrumentMessage) -> None:
        for p in msg.pairs:
            st.instr[p.symbol] = (p.price_precision, p.qty_precision)
            old = st.prec.get(p.symbol)
            if old is not None:
                st.prec.pop(p.symbol)
                if self._resolve_precision(st, p.symbol, 0) != old:
                    st.books.pop(p.symbol, None)

    def _book(self, st: _FileState, line: int, frame: bytes) -> None:
        try:
            updates = decode_book(frame, st.prec)
        except WireError as e:
            unknown = [s.decode("utf-8", "replace") for s in _SYMBOL_RE.findall(frame)]
            unknown = [s for s in unknown if s not in st.prec]
            if not unknown:
                self._bad_frame(st, line, frame, e)
                return
            for sym in unknown:
                self._resolve_precision(st, sym, line)
            try:
                updates = decode_book(frame, st.prec)
            except WireError as e2:
                self._bad_frame(st, line, frame, e2)
                return
        for u in updates:
            sym = u.symbol
            s = self._stats(sym)
            if u.snapshot:
                pp, qp = st.prec[sym]
                book = st.books[sym] = Book(sym, self._depth(st, sym), pp, qp)
                s.snapshots += 1
                s.depth, s.price_precision, s.qty_precision = book.depth, pp, qp
            else:
                book = st.books.get(sym)
                if book is None:
                    s.skipped += 1
                    self.skipped += 1
                    continue
            try:
                crc = book.apply(u.snapshot, u.bids, u.asks)
            except CrossedBook as e:
                crc = book.last_checksum
                s.crossed += 1
                self.crossed_n += 1
                if len(self.crossed) < MAX_LISTED:
                    self.crossed.append({"file": st.path, "line": line, "symbol": sym,
                                         "best_bid": e.bid, "best_ask": e.ask})
            s.checksums += 1
            self.checksums += 1
            if crc == u.checksum:
                s.ok += 1
                self.ok += 1
            else:
                s.mismatch += 1
                self.mismatch += 1
                if len(self.mismatches) < MAX_LISTED:
                    self.mismatches.append({"file": st.path, "line": line, "symbol": sym,
                                            "expected": u.checksum, "computed": crc})

    def _bad_frame(self, st: _FileState, line: int, frame: bytes, e: WireError) -> None:
        self.bad_frames += 1
        m = _SYMBOL_RE.search(frame)
        sym = m.group(1).decode("utf-8", "replace") if m else None
        if sym is not None:
            self._stats(sym).bad_frames += 1
            st.books.pop(sym, None)  # its book can no longer be trusted: wait for a snapshot
        if len(self.errors) < MAX_LISTED:
            self.errors.append({"kind": "bad_frame", "file": st.path, "line": line,
                                "symbol": sym, "error": str(e)})

    # -- results -------------------------------------------------------------------
    @property
    def passed(self) -> bool:
        return (self.checksums > 0 and self.mismatch == 0 and self.crossed_n == 0
                and self.bad_frames == 0)

    def result(self) -> dict:
        return {
            "frames": self.frames, "checksums": self.checksums, "ok": self.ok,
            "mismatch": self.mismatch,
            "symbols": {k: v.as_dict() for k, v in sorted(self.symbols.items())},
            "mismatches": self.mismatches,
            "files": len(self.files), "lines": self.lines, "tx": self.tx,
            "raw_b64": self.raw, "other_lines": self.other_lines,
            "channels": dict(sorted(self.channels.items())),
            "skipped": self.skipped, "crossed": self.crossed_n, "crossed_books": self.crossed,
            "bad_frames": self.bad_frames, "truncated_tail": self.truncated,
            "errors": self.errors,
        }

    def summary(self) -> str:
        out = [f"bookd.verify: {len(self.files)} file(s), {self.lines:,} lines, "
               f"{self.frames:,} frames ({self.tx:,} client-sent), {self.raw:,} raw_b64 "
               f"lines skipped"]
        for f in self.files:
            part = f" (continues {f['continues']}, books carried over)" \
                if f["continues"] else ""
            out.append(f"  {f['file']} [{f['kind']}]{part}: {f['frames']:,} frames, "
                       f"{f['checksums']:,} checksums, {f['ok']:,} ok, "
                       f"{f['mismatch']:,} mismatch")
        if self.channels:
            out.append("  frames by channel: " + ", ".join(
                f"{k} {v:,}" for k, v in sorted(self.channels.items())))
        if self.symbols:
            out.append(f"  {'symbol':<16}{'depth':>6}{'prec':>7}{'checksums':>11}{'ok':>10}"
                       f"{'mismatch':>10}{'crossed':>9}{'skipped':>9}{'bad':>6}")
            for sym, s in sorted(self.symbols.items()):
                prec = f"{s.price_precision}/{s.qty_precision}"
                out.append(f"  {sym:<16}{s.depth or '-':>6}{prec:>7}{s.checksums:>11,}"
                           f"{s.ok:>10,}{s.mismatch:>10,}{s.crossed:>9,}{s.skipped:>9,}"
                           f"{s.bad_frames:>6,}")
        for m in self.mismatches:
            out.append(f"  MISMATCH {m['file']}:{m['line']} {m['symbol']}: "
                       f"expected {m['expected']}, computed {m['computed']}")
        for c in self.crossed:
            out.append(f"  CROSSED {c['file']}:{c['line']} {c['symbol']}: best bid "
                       f"{c['best_bid']} >= best ask {c['best_ask']} (ticks)")
        for e in self.errors:
            what = "BAD FRAME" if e["kind"] == "bad_frame" else "NOTE"
            out.append(f"  {what} {e['file']}:{e['line']} {e['symbol'] or ''}: {e['error']}")
        if self.passed:
            out.append(f"OK: all {self.checksums:,} checksums match")
        elif self.checksums == 0:
            out.append("FAIL: no checksum was checked")
        else:
            out.append(f"FAIL: {self.mismatch:,} of {self.checksums:,} checksums mismatch, "
                       f"{self.crossed_n:,} crossed books, {self.bad_frames:,} bad book frames")
        return "\n".join(out)


def _nonneg(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return v


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


def _symbol_precision(text: str) -> tuple[str, tuple[int, int]]:
    sym, eq, pq = text.rpartition("=")
    p, slash, q = pq.partition("/")
    if not (sym and eq and slash and p.isdigit() and q.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not SYMBOL=P/Q (e.g. MINA/GBP=4/8)")
    return sym, (int(p), int(q))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bookd.verify",
        description="Verify every Kraken v2 book checksum in recordings, DepthCharge "
                    "captures and files of bare messages (.gz too) with the book core. "
                    "Prints a summary, then one JSON object as the last line. Exit 0: all "
                    "checksums match (at least one); 1: a mismatch, crossed book, bad book "
                    "frame, or nothing checked; 2: unreadable input.")
    p.add_argument("files", nargs="+", metavar="FILE", help="recording or message file")
    p.add_argument("--depth", type=_positive, default=None,
                   help="subscribed depth for every symbol (default: file header, then the "
                        "subscribe request or ack, else 10)")
    p.add_argument("--price-precision", type=_nonneg, default=None, metavar="P",
                   help="price decimals for every symbol (default: file header or _meta, "
                        "then instrument frames)")
    p.add_argument("--qty-precision", type=_nonneg, default=None, metavar="Q",
                   help="quantity decimals for every symbol (same defaults)")
    p.add_argument("--precision", action="append", default=[], type=_symbol_precision,
                   metavar="SYMBOL=P/Q",
                   help="price/qty decimals of one symbol, e.g. MINA/GBP=4/8 (repeatable; "
                        "wins over --price-precision/--qty-precision)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    v = Verifier(args.depth, args.price_precision, args.qty_precision, not args.quiet,
                 dict(args.precision))
    try:
        for path in args.files:
            v.run_file(path)
    except RecFileError as e:
        print(f"bookd.verify: {e}", file=sys.stderr, flush=True)
        return 2
    sys.stderr.flush()
    out = sys.stdout
    out.write(v.summary() + "\n")
    out.write(msgspec.json.encode(v.result()).decode() + "\n")
    out.flush()
    return 0 if v.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
