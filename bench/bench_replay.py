"""Replay server throughput: book frames/s to one loopback picows client.

Starts `python -m replay --speed max --loop` on a recording in a subprocess (default:
the DepthCharge MINA/GBP depth-25 capture at precisions 4/8), connects a picows client on
uvloop, subscribes to every symbol's book and counts the book frames received per
second. With `--verify` the client also decodes every frame and checks its checksum
through the book core (slower: it measures the client, not the server).

    .venv/bin/python bench/bench_replay.py [--seconds 5] [--reps 3] [--verify]
        [--file REC --price-precision P --qty-precision Q]

Prints one line per rep and the median. No assertions (CONVENTIONS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bookd.book import Book  # noqa: E402
from ingest.wire import decode_book  # noqa: E402
from replay.source import RecordingSource  # noqa: E402

DEFAULT_REC = "/work/shared/kraken/vectors/depthcharge_kraken_minagbp_d25_20260816.ndjson"
BOOK_PREFIX = b'{"channel":"book"'


class Counter(WSListener):
    def __init__(self, verify: bool, precisions: dict, depth: int) -> None:
        self.books = 0
        self.other = 0
        self.bad = 0
        self.verify = verify
        self.precisions = precisions
        self.book = {s: Book(s, depth, *p) for s, p in precisions.items()}

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != WSMsgType.TEXT:
            return
        payload = frame.get_payload_as_bytes()
        if payload.startswith(BOOK_PREFIX):
            self.books += 1
            if self.verify:
                for u in decode_book(payload, self.precisions):
                    if self.book[u.symbol].apply(u.snapshot, u.bids, u.asks) != u.checksum:
                        self.bad += 1
        else:
            self.other += 1


async def one_rep(url: str, symbols: tuple[str, ...], depth: int, precisions: dict,
                  seconds: float, verify: bool) -> tuple[float, int]:
    transport, listener = await ws_connect(lambda: Counter(verify, precisions, depth), url)
    names = ",".join(f'"{s}"' for s in symbols)
    sub = ('{"method":"subscribe","params":{"channel":"book","symbol":[' + names
           + f'],"depth":{depth}}},"req_id":1}}')
    transport.send(WSMsgType.TEXT, sub.encode())
    await asyncio.sleep(0.5)                       # warm up
    b0, t0 = listener.books, time.perf_counter()
    await asyncio.sleep(seconds)
    b1, t1 = listener.books, time.perf_counter()
    transport.disconnect()
    await transport.wait_disconnected()
    return (b1 - b0) / (t1 - t0), listener.bad


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "replay", "--file", args.file, "--speed", "max", "--loop",
           "--port", "0", "--control-port", "0"]
    if args.price_precision is not None:
        cmd += ["--price-precision", str(args.price_precision),
                "--qty-precision", str(args.qty_precision)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stderr is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        if "listening on" in line:
            return proc, line.split("listening on ", 1)[1].split()[0]
    proc.kill()
    raise SystemExit(f"replay server did not start: {line!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", default=DEFAULT_REC)
    ap.add_argument("--price-precision", type=int,
                    help="price decimals (default: 4 for the default capture, else the header's)")
    ap.add_argument("--qty-precision", type=int)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--verify", action="store_true")
    args = ap.parse_args()
    if args.file == DEFAULT_REC and args.price_precision is None:
        args.price_precision, args.qty_precision = 4, 8
    src = RecordingSource.from_path(args.file, price_precision=args.price_precision,
                                    qty_precision=args.qty_precision)
    proc, url = start_server(args)
    try:
        rates = []
        for rep in range(args.reps):
            rate, bad = uvloop.run(one_rep(url, src.symbols, src.depth, src.precisions,
                                           args.seconds, args.verify))
            rates.append(rate)
            extra = f", {bad} checksum mismatches" if args.verify else ""
            print(f"rep {rep + 1}: {rate / 1000:.1f} k book frames/s{extra}")
        print(f"median: {statistics.median(rates) / 1000:.1f} k book frames/s "
              f"({args.file}, --speed max --loop, one loopback client"
              f"{', verifying' if args.verify else ''})")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
