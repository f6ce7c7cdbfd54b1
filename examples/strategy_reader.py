"""A minimal strategy process reading bookd's shared-memory book.

    python examples/strategy_reader.py [--config FILE] [--namespace NS] [--pair BTC/USD]
                                       [--seconds 10]

Once a second it takes a consistent snapshot and prints best bid, best ask and mid
(exact decimals) with the book's state. It only trusts VALID books: while bookd resyncs
a pair (checksum mismatch or gap), or the book is stale (bookd gone or silent) or
halted, it says so and does nothing with the prices. It also shows the zero-copy route
(`reader.view()`) for the best level. It keeps running across a bookd restart: the
reader moves to the new generation by itself.

Exit status: 0 after --seconds, 1 if no book appears within --attach-timeout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    import bookd  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bookd.layout import AttachTimeout, BookState  # noqa: E402
from bookd.reader import BookReader, BookView  # noqa: E402


def best_level_zero_copy(view: BookView) -> tuple[int, int] | None:
    """Best bid and ask price ticks read in place (validated by the seqlock)."""
    def read(v: BookView) -> tuple[int, int] | None:
        if v.n_bids == 0 or v.n_asks == 0:
            return None
        return int(v.bid_prices[0]), int(v.ask_prices[0])
    return view.consistent(read)


def run(pair: str, namespace: str, seconds: float, attach_timeout: float) -> int:
    try:
        reader = BookReader.attach(pair, timeout=attach_timeout, namespace=namespace)
    except AttachTimeout as e:
        print(f"strategy_reader: {e}", file=sys.stderr)
        return 1
    with reader:
        print(f"attached to {pair} in namespace {namespace!r}, generation {reader.generation}",
              flush=True)
        end = time.monotonic() + seconds
        generation = reader.generation
        while True:
            snap = reader.snapshot()
            if snap.generation != generation:
                print(f"bookd restarted: now generation {snap.generation}", flush=True)
                generation = snap.generation
            age = f"{snap.age_ns / 1e6:.0f} ms" if snap.age_ns is not None else "no data yet"
            if snap.state is BookState.VALID and snap.best_bid and snap.best_ask:
                with reader.view() as view:
                    ticks = best_level_zero_copy(view)
                print(f"{pair} valid  bid {snap.best_bid[0]:f}  ask {snap.best_ask[0]:f}  "
                      f"mid {snap.mid:f}  (zero-copy best ticks {ticks})  age {age}",
                      flush=True)
            elif snap.state is BookState.RESYNCING:
                print(f"{pair} resyncing: bookd is fetching a fresh snapshot; not trading",
                      flush=True)
            elif snap.state is BookState.STALE:
                print(f"{pair} stale: bookd is gone or the book is silent ({age}); "
                      f"not trading", flush=True)
            elif snap.state is BookState.HALTED:
                print(f"{pair} halted: the halt authority stopped the feed; not trading",
                      flush=True)
            else:
                print(f"{pair} {snap.state.word}: no book yet", flush=True)
            left = end - time.monotonic()
            if left <= 0:
                return 0
            time.sleep(min(1.0, left))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Print a pair's best bid/ask/mid from bookd's "
                                             "shared memory once a second.")
    ap.add_argument("--config", help="config file (default: etc/krakenfeed.toml)")
    ap.add_argument("--namespace", help="shared-memory namespace (default: from the config)")
    ap.add_argument("--pair", help="pair, e.g. BTC/USD (default: the config's first pair)")
    ap.add_argument("--seconds", type=float, default=10.0, help="run time (default 10)")
    ap.add_argument("--attach-timeout", type=float, default=5.0,
                    help="seconds to wait for bookd's book (default 5)")
    args = ap.parse_args(argv)
    namespace, pair = args.namespace, args.pair
    if namespace is None or pair is None:
        from ingest.config import exit_on_config_error

        cfg = exit_on_config_error(args.config, "strategy_reader")
        namespace = namespace or cfg.namespace
        pair = pair or cfg.trading.pairs[0]
    try:
        return run(pair, namespace, args.seconds, args.attach_timeout)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
