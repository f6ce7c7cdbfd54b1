"""Baseline (a): the seed's own design, end to end in one asyncio process.

gal_friday's DataIngestor (../shared/seed/data_ingestor.md) in one process, as the
seed built it: a `websockets` client on the default asyncio loop subscribes to the
book channel, every frame goes through `json.loads(parse_float=Decimal)`, the books are
`sortedcontainers.SortedDict`s of Decimals (bench/seed_baseline.py, the same class the
in-process core comparison times), levels are applied in order, the book is truncated
to the subscribed depth, and the CRC32 is computed with string formatting and compared
on **every** message. Each validated message becomes an event dict (pair, timestamp,
source, bids, asks as `[price, qty]` strings, checksum) put on an in-process
`asyncio.Queue`, which a consumer task drains (the seed's PubSubManager).

    python bench/baseline_seed.py --url ws://127.0.0.1:PORT/v2 --file RECORDING
        [--expect N] [--max-seconds S] [--idle-seconds 1.0]

The recording's header gives the symbols, depth and precisions. The run ends after
`--expect` book frames, after `--max-seconds` of book data, or when no book frame came
for `--idle-seconds`. Prints one JSON object: book messages, seconds (first to last
book frame), msgs_per_s, checked, mismatches, events consumed, CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from decimal import Decimal
from pathlib import Path

import websockets
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent))

from seed_baseline import SeedBook  # noqa: E402


def read_header(path: str) -> tuple[list[str], int, dict[str, tuple[int, int]]]:
    with open(path, "rb") as f:
        head = json.loads(f.readline())
    prec = {s: (int(p), int(q)) for s, (p, q) in head["precisions"].items()}
    return list(head["symbols"]), int(head["depth"]), prec


class SeedIngestor:
    """The seed's book path: parse, apply, checksum, publish an event to a queue."""

    def __init__(self, symbols: list[str], depth: int, prec: dict[str, tuple[int, int]]):
        self.books = {s: SeedBook(s, depth, *prec[s]) for s in symbols}
        self.queue: asyncio.Queue = asyncio.Queue()
        self.messages = 0
        self.checked = 0
        self.mismatches = 0
        self.consumed = 0
        self.first = self.last = 0.0
        self.cpu_first = self.cpu_last = 0.0

    def on_message(self, raw: str | bytes) -> None:
        msg = json.loads(raw, parse_float=Decimal)
        if not isinstance(msg, dict) or msg.get("channel") != "book":
            return
        snapshot = msg.get("type") == "snapshot"
        for entry in msg["data"]:
            book = self.books.get(entry["symbol"])
            if book is None:
                continue
            crc = book.apply(entry, snapshot)
            self.checked += 1
            if crc != int(entry["checksum"]):
                self.mismatches += 1
                continue
            self.queue.put_nowait({
                "pair": book.symbol, "timestamp": entry.get("timestamp"),
                "source": "kraken_ws_v2",
                "bids": [[str(p), str(q)] for p, q in reversed(book.bids.items())],
                "asks": [[str(p), str(q)] for p, q in book.asks.items()],
                "checksum": crc})
        now = time.perf_counter()
        cpu = time.process_time()
        if not self.messages:
            self.first, self.cpu_first = now, cpu
        self.last, self.cpu_last = now, cpu
        self.messages += 1

    async def consume(self) -> None:
        while True:
            await self.queue.get()
            self.consumed += 1


async def run(args: argparse.Namespace) -> dict:
    symbols, depth, prec = read_header(args.file)
    ing = SeedIngestor(symbols, depth, prec)
    consumer = asyncio.get_running_loop().create_task(ing.consume())
    async with connect(args.url, max_size=None) as ws:
        await ws.send(json.dumps({"method": "subscribe", "params": {
            "channel": "book", "symbol": symbols, "depth": depth}, "req_id": 1}))

        async def watchdog() -> None:
            seen, quiet_since = -1, time.perf_counter()
            while True:
                await asyncio.sleep(0.1)
                now = time.perf_counter()
                if ing.messages != seen:
                    seen, quiet_since = ing.messages, now
                if (ing.messages and now - quiet_since > args.idle_seconds) or \
                        (ing.messages and now - ing.first > args.max_seconds) or \
                        (not ing.messages and now - quiet_since > 30):
                    await ws.close()
                    return

        dog = asyncio.get_running_loop().create_task(watchdog())
        try:
            async for raw in ws:
                ing.on_message(raw)
                if args.expect and ing.messages >= args.expect:
                    break
        except websockets.ConnectionClosed:
            pass
        dog.cancel()
    await asyncio.sleep(0)          # let the consumer drain what is queued
    while not ing.queue.empty():
        await asyncio.sleep(0)
    consumer.cancel()
    dt = max(ing.last - ing.first, 1e-9)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"baseline": "seed", "messages": ing.messages, "seconds": dt,
            "msgs_per_s": (ing.messages - 1) / dt if ing.messages > 1 else 0.0,
            "checked": ing.checked, "mismatches": ing.mismatches,
            "events_consumed": ing.consumed, "cpu_s": ru.ru_utime + ru.ru_stime,
            "cpu_us_per_msg": (ing.cpu_last - ing.cpu_first) * 1e6 / max(1, ing.messages - 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--file", required=True, help="the recording the server plays")
    ap.add_argument("--expect", type=int, default=0, help="stop after N book frames")
    ap.add_argument("--max-seconds", type=float, default=30.0)
    ap.add_argument("--idle-seconds", type=float, default=1.0)
    args = ap.parse_args(argv)
    print(json.dumps(asyncio.run(run(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
