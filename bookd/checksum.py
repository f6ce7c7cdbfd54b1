"""Kraken v2 book checksum (PROTOCOL.md section 3), on integer ticks.

CRC32 (zlib, IEEE) of the top 10 asks ascending, then the top 10 bids descending, each
level written as `str(price_ticks) + str(qty_ticks)`. At the instrument precision the
wire token *is* the decimal spelling of its tick count, so removing the dot and the
leading zeros of the token gives exactly `str(ticks)`: trailing zeros stay, leading
zeros vanish by themselves, and no float or exponent notation can creep in.

The book core caches each level's chunk (`level_chunk`) when the level changes, so a
checksum is two joins and two CRC calls (PERFORMANCE.md row 2: ~0.56 us). Pure module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from zlib import crc32

TOP = 10


def level_chunk(price_ticks: int, qty_ticks: int) -> bytes:
    """The checksum text of one level."""
    return b"%d%d" % (price_ticks, qty_ticks)


def checksum_chunks(ask_chunks: Sequence[bytes], bid_chunks: Sequence[bytes]) -> int:
    """CRC32 of the first 10 cached chunks of each side (asks best first, then bids).

    Chained as crc32(bids text, crc32(asks text)): Book.apply keeps both parts between
    messages and recomputes only the side a message touched.
    """
    return crc32(b"".join(bid_chunks[:TOP]), crc32(b"".join(ask_chunks[:TOP])))


def checksum_levels(asks: Iterable[tuple[int, int]], bids: Iterable[tuple[int, int]]) -> int:
    """Checksum from plain (price_ticks, qty_ticks) levels, each side best first.

    Only the first 10 of each side are used. For tools and tests; the book core uses
    its cached chunks.
    """
    a = [level_chunk(p, q) for p, q in list(asks)[:TOP]]
    b = [level_chunk(p, q) for p, q in list(bids)[:TOP]]
    return checksum_chunks(a, b)


def checksum_text(asks: Iterable[tuple[int, int]], bids: Iterable[tuple[int, int]]) -> str:
    """The string Kraken's docs show before the CRC (asks part then bids part)."""
    a = list(asks)[:TOP]
    b = list(bids)[:TOP]
    return "".join(f"{p}{q}" for p, q in a) + "".join(f"{p}{q}" for p, q in b)
