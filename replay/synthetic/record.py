"""`python -m replay.synthetic`: write the synthetic market as a recording.

`write_recording` writes `duration_s` seconds of a `SyntheticMarket` in the recording
format (DESIGN.md section 3), with the client's subscribe requests, the acks, the
instrument snapshot, heartbeats and every frame's `rx_ns`; `main` is the command line
(`--help`).
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time

import msgspec

from ingest.config import INTERVAL_MINUTES, MINUTES_INTERVAL, ConfigError, load_config

from ..source import BOOK_DEPTHS
from .market import SyntheticMarket, rfc3339

__all__ = ["write_recording", "build_parser", "main"]



def write_recording(path: str, market: SyntheticMarket, duration_s: float, *,
                    heartbeats: bool = True, progress: bool = False) -> dict:
    """Write `duration_s` seconds of `market` as a recording; returns counts."""
    n_book = max(1, int(duration_s * market.rate))
    t0 = market.now_ns
    rx0 = 10**12 + (market.seed % 10**6) * 10**6  # a perf_counter_ns-like origin
    header = {
        "format": "krakenfeed-recording", "version": 1,
        "url": f"synthetic://seed/{market.seed}", "symbols": list(market.symbols),
        "depth": market.depth,
        "precisions": {s: list(pq) for s, pq in market.precisions.items()},
        "clock": "perf_counter_ns", "started_utc": rfc3339(t0),
        "synthetic": {"seed": market.seed, "rate": market.rate, "duration_s": duration_s,
                      "extreme": market.extreme, "trade_ratio": market.trade_ratio,
                      "intervals": list(market.intervals), "status_prob": market.status_prob},
    }
    lines = 0
    last_rx = 0
    buf: list[bytes] = []
    wall0 = last_print = time.monotonic()

    def put(t_ns: int, frame: bytes, tx: bool = False) -> None:
        nonlocal lines, last_rx
        rx = max(last_rx + 1, rx0 + t_ns - t0 + 180_000)  # ~180 us network latency
        last_rx = rx
        buf.append((b'{"rx_ns":%d,"dir":"tx","frame":' if tx else b'{"rx_ns":%d,"frame":')
                   % rx + frame + b"}\n")
        lines += 1

    syms = msgspec.json.encode(list(market.symbols)).decode()
    ids = {"instrument": 1, "book": 2, "trade": 3}
    ids.update({f"ohlc{m}": 4 + i for i, m in enumerate(market.intervals)})
    gz = path.endswith(".gz")
    with (gzip.open(path, "wb", compresslevel=5) if gz else open(path, "wb")) as out:
        out.write(msgspec.json.encode(header) + b"\n")
        t = t0  # the session; updates start 200 ms later
        put(t, b'{"method":"subscribe","params":{"channel":"instrument"},"req_id":1}', True)
        put(t, (f'{{"method":"subscribe","params":{{"channel":"book","symbol":{syms},'
                f'"depth":{market.depth},"snapshot":true}},"req_id":2}}').encode(), True)
        put(t, (f'{{"method":"subscribe","params":{{"channel":"trade","symbol":{syms}}},'
                f'"req_id":3}}').encode(), True)
        for i, m in enumerate(market.intervals):
            put(t, (f'{{"method":"subscribe","params":{{"channel":"ohlc","symbol":{syms},'
                    f'"interval":{m},"snapshot":false}},"req_id":{4 + i}}}').encode(), True)
        put(t + 2 * 10**6, market.status_frame())
        acks = market.ack_frames(ids)
        put(t + 20 * 10**6, acks[0])
        put(t + 21 * 10**6, market.instrument_frame())
        for a in acks[1:]:
            put(t + 40 * 10**6, a)
        for s in market.symbols:
            put(t + 120 * 10**6, market.snapshot_frame(s))
        market.now_ns += 200 * 10**6
        next_hb = t0 + 10**9
        books = 0
        while books < n_book:
            f = market.next_event()
            while heartbeats and f.ts_ns >= next_hb:
                put(next_hb, b'{"channel":"heartbeat"}')
                next_hb += 10**9
            put(f.ts_ns, f.frame)
            if f.channel == "book":
                books += 1
                if len(buf) >= 4096:
                    out.write(b"".join(buf))
                    buf.clear()
                    now = time.monotonic()
                    if progress and now - last_print >= 5.0:
                        last_print = now
                        print(f"replay.synthetic: {lines:,} frames, {books / n_book:.0%} of "
                              f"{n_book:,} book messages, {lines / (now - wall0):,.0f} "
                              "frames/s", file=sys.stderr, flush=True)
        out.write(b"".join(buf))
    counts = dict(market.counts)
    counts.update(frames=lines, seconds=time.monotonic() - wall0,
                  market_seconds=(market.now_ns - t0) / 1e9)
    return counts


def _intervals(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if part in INTERVAL_MINUTES:
            out.append(INTERVAL_MINUTES[part])
        elif part.isdigit() and int(part) in MINUTES_INTERVAL:
            out.append(int(part))
        else:
            raise argparse.ArgumentTypeError(
                f"unknown interval {part!r}: one of {', '.join(INTERVAL_MINUTES)} (or minutes)")
    return tuple(out)


def _precision(text: str) -> tuple[str, tuple[int, int]]:
    sym, _, pq = text.rpartition("=")
    p, _, q = pq.partition("/")
    if not (sym and p.isdigit() and q.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not SYMBOL=P/Q (e.g. PEPE/USD=9/8)")
    return sym, (int(p), int(q))


def _checked(kind: type, ok, what: str):  # noqa: ANN001, ANN202 - argparse converters
    def conv(text: str):  # noqa: ANN202
        v = kind(text)
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v
    return conv


_positive_int = _checked(int, lambda v: v > 0, "> 0")
_positive = _checked(float, lambda v: v > 0, "> 0")
_fraction = _checked(float, lambda v: 0 <= v <= 1, "between 0 and 1")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m replay.synthetic",
        description="Write a reproducible synthetic Kraken v2 market as a krakenfeed "
                    "recording (replay it with `python -m replay`, check it with `python -m "
                    "bookd.verify`). Same arguments, same bytes.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--pairs", type=_positive_int, metavar="N",
                   help="generate N pairs named SYN1/USD, SYN2/USD, ... with varied "
                        "precisions (BTC-like 1/8, ETH-like 2/8, meme coins 9/8 and 10/8 with "
                        "quantities of 1e9 and more, ...)")
    g.add_argument("--symbols", metavar="A/B,C/D",
                   help="comma-separated pair names; known ones (BTC/USD, ETH/USD, SOL/USD, "
                        "XRP/USD, MINA/GBP, PEPE/USD, SHIB/USD) get realistic profiles. "
                        "Default without --pairs/--symbols: [trading] pairs of --config")
    p.add_argument("--rate", type=_positive, default=100.0, metavar="R",
                   help="book messages per second across all pairs (rx_ns spacing 1e9/R; "
                        "default 100)")
    p.add_argument("--depth", type=int, choices=BOOK_DEPTHS, default=10,
                   help="subscribed book depth (default 10)")
    p.add_argument("--duration", type=_positive, default=60.0, metavar="S",
                   help="seconds of market time: S*R book messages (default 60)")
    p.add_argument("--seed", type=int, default=1, metavar="K", help="random seed (default 1)")
    p.add_argument("--extreme", action="store_true",
                   help="add 19-20-digit quantities (still below 2**64 ticks); by default "
                        "every value stays within 15 significant digits")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="output recording (.gz: gzip)")
    p.add_argument("--precision", action="append", default=[], type=_precision,
                   metavar="SYMBOL=P/Q", help="override one pair's price/qty precision "
                                              "(repeatable)")
    p.add_argument("--trade-ratio", type=_fraction, default=0.05, metavar="F",
                   help="trades per book message (default 0.05: 1 in 20); each trade also "
                        "sends a candle per interval")
    p.add_argument("--intervals", type=_intervals, default=(1,), metavar="LIST",
                   help="OHLC intervals, e.g. 1m,5m,1h (default 1m)")
    p.add_argument("--status-prob", type=_fraction, default=0.0, metavar="P",
                   help="chance per book message of a pair status change (instrument "
                        "update; default 0: none)")
    p.add_argument("--kraken-order", action="store_true",
                   help="keep each message's levels in the order the changes happened (a "
                        "delete directly followed by its refill), as Kraken sends them; "
                        "default: shuffled within the message (repeated prices keep order)")
    p.add_argument("--no-heartbeats", action="store_true",
                   help="omit the 1 Hz heartbeat frames")
    p.add_argument("--config", default=None,
                   help="config file for the default pair list (default etc/krakenfeed.toml "
                        "or $KRAKENFEED_CONFIG); read only without --pairs/--symbols")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.pairs:
        pairs = [f"SYN{i}/USD" for i in range(1, args.pairs + 1)]
    elif args.symbols:
        pairs = [s.strip() for s in args.symbols.split(",") if s.strip()]
    else:
        try:
            pairs = list(load_config(args.config).trading.pairs)
        except ConfigError as e:
            print(f"replay.synthetic: invalid configuration: {e} (or pass --pairs/--symbols)",
                  file=sys.stderr)
            return 78
    try:
        market = SyntheticMarket(pairs, args.depth, args.seed, dict(args.precision),
                                 args.extreme, rate=args.rate, trade_ratio=args.trade_ratio,
                                 intervals=args.intervals, status_prob=args.status_prob,
                                 shuffle=not args.kraken_order)
        counts = write_recording(args.out, market, args.duration,
                                 heartbeats=not args.no_heartbeats, progress=not args.quiet)
    except ValueError as e:
        print(f"replay.synthetic: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"replay.synthetic: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    secs = counts["seconds"]
    removal = counts["removals"] / max(1, counts["levels"])
    print(f"replay.synthetic: wrote {args.out}: {counts['frames']:,} frames ({counts['book']:,} "
          f"book, {counts['trade']:,} trade, {counts['ohlc']:,} ohlc, {counts['instrument']:,} "
          f"status) for {len(pairs)} pairs at depth {args.depth}, "
          f"{counts['levels'] / max(1, counts['book']):.2f} levels/update, {removal:.0%} "
          f"removals, seed {args.seed}, {counts['market_seconds']:.1f} s of market in "
          f"{secs:.1f} s ({counts['frames'] / max(secs, 1e-9):,.0f} frames/s)")
    return 0
