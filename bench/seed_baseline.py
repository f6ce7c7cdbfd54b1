"""The seed's book design, written the straightforward way: the baseline of bench_core.py.

gal_friday's DataIngestor (../shared/seed/data_ingestor.md) parsed every frame with
`json`, kept one `sortedcontainers.SortedDict` per side of `Decimal` prices, and checked
the CRC32 of each message. This is that design done right (PROTOCOL.md 3.1 and 3.4):
`json.loads(parse_float=Decimal)`, levels applied in order, truncation to the subscribed
depth, and the checksum text formatted from the Decimals at the instrument precision
with an f-string (the only formatting that verifies float-reserialised sources such as
the python-kraken-sdk fixture). bench_core.py checks that it gets every checksum right
before timing it.
"""

from __future__ import annotations

import json
import zlib
from decimal import Decimal

from sortedcontainers import SortedDict


class SeedBook:
    """One pair's book: SortedDict[Decimal, Decimal] per side."""

    def __init__(self, symbol: str, depth: int, price_precision: int, qty_precision: int):
        self.symbol = symbol
        self.depth = depth
        self.pp = price_precision
        self.qp = qty_precision
        self.bids: SortedDict = SortedDict()
        self.asks: SortedDict = SortedDict()

    def apply(self, entry: dict, snapshot: bool) -> int:
        """Apply one `data[]` entry of a book message, truncate, return the checksum."""
        if snapshot:
            self.bids.clear()
            self.asks.clear()
        for side, levels in ((self.bids, entry.get("bids", ())), (self.asks, entry.get("asks", ()))):
            for lv in levels:
                if lv["qty"] == 0:
                    side.pop(lv["price"], None)
                else:
                    side[lv["price"]] = lv["qty"]
        while len(self.bids) > self.depth:
            self.bids.popitem(0)  # lowest bid
        while len(self.asks) > self.depth:
            self.asks.popitem(-1)  # highest ask
        return self.checksum()

    def checksum(self) -> int:
        pp, qp = self.pp, self.qp
        parts = []
        for price in self.asks.islice(0, 10):
            parts.append(f"{price:.{pp}f}".replace(".", "").lstrip("0"))
            parts.append(f"{self.asks[price]:.{qp}f}".replace(".", "").lstrip("0"))
        for price in self.bids.islice(0, 10, reverse=True):
            parts.append(f"{price:.{pp}f}".replace(".", "").lstrip("0"))
            parts.append(f"{self.bids[price]:.{qp}f}".replace(".", "").lstrip("0"))
        return zlib.crc32("".join(parts).encode())


class SeedBooks:
    """The seed's message handler for book frames: parse, apply, compare checksums."""

    def __init__(self, depth: int, precisions: dict[str, tuple[int, int]]):
        self.books = {s: SeedBook(s, depth, *p) for s, p in precisions.items()}
        self.mismatches = 0
        self.checked = 0

    def on_frame(self, frame: bytes) -> None:
        msg = json.loads(frame, parse_float=Decimal)
        snapshot = msg["type"] == "snapshot"
        for entry in msg["data"]:
            crc = self.books[entry["symbol"]].apply(entry, snapshot)
            self.checked += 1
            if crc != int(entry["checksum"]):
                self.mismatches += 1
