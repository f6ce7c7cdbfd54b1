"""`SyntheticSource`: the synthetic market as a live `replay.source.Source`."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from ..source import BOOK_DEPTHS, Source, SourceEvent
from .market import SyntheticMarket

__all__ = ["SyntheticSource"]


class SyntheticSource(Source):
    """A live `replay.source.Source`: each `events()` stream is its own copy of the
    market from the seed (so every connection sees the same market, reproducibly),
    starting with a snapshot of every symbol at t_ns 0, then book messages 1e9/rate ns
    apart (rate adjustable live with `set_rate`), trades and candles. Exchange
    timestamps run from the wall clock at the start of the stream. Instrument status
    changes are not part of the stream (the Source contract carries book, trade and ohlc
    events only); `instrument_frame()` serves the pairs with their precisions.
    `duration_s` ends each stream after that many seconds of market time (None: never).
    """

    def __init__(self, pairs: Sequence[str], depth: int = 10, seed: int = 1,
                 precisions: dict[str, tuple[int, int]] | None = None,
                 extreme: bool = False, *, rate: float = 100.0, trade_ratio: float = 0.05,
                 intervals: Sequence[int] = (1,), duration_s: float | None = None) -> None:
        if depth not in BOOK_DEPTHS:
            raise ValueError(f"depth must be one of {BOOK_DEPTHS}, got {depth}")
        self._kw = dict(pairs=list(pairs), depth=depth, seed=seed, precisions=precisions,
                        extreme=extreme, trade_ratio=trade_ratio, intervals=tuple(intervals))
        template = SyntheticMarket(**self._kw)
        self._instrument = template.instrument_frame()
        self.symbols = template.symbols
        self.depth = depth
        self.precisions = template.precisions
        self.seed = seed
        self.extreme = extreme
        self.duration_s = duration_s
        self.rate = 1.0
        self.set_rate(rate)

    def set_rate(self, per_s: float) -> None:
        if not per_s > 0:
            raise ValueError(f"rate must be > 0, got {per_s}")
        self.rate = float(per_s)

    def instrument_frame(self) -> bytes | None:
        return self._instrument

    def describe(self) -> str:
        return (f"synthetic market seed {self.seed}: {len(self.symbols)} pairs "
                f"{', '.join(self.symbols[:6])}{' ...' if len(self.symbols) > 6 else ''} at "
                f"depth {self.depth}, {self.rate:g} book msgs/s"
                f"{', extreme values' if self.extreme else ''}")

    def events(self) -> Iterator[SourceEvent]:
        start = time.time_ns()
        m = SyntheticMarket(**self._kw, start_ns=start)
        for s in m.symbols:
            f = m.snapshot_event(s)
            yield SourceEvent(0, "book", s, f.frame, True, 0, [f.update])
        t = 0.0
        end = None if self.duration_s is None else self.duration_s * 1e9
        while True:
            if not m.pending:
                t += 1e9 / self.rate
                if end is not None and t > end:
                    return
            f = m.next_event(start + int(t))
            yield SourceEvent(int(t), f.channel, f.symbol, f.frame, False, f.interval,
                              None if f.update is None else [f.update])
