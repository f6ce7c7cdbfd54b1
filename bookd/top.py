"""`python -m bookd.top`: bookd's books, one line per pair, straight from shared memory.

    python -m bookd.top [--config FILE] [--namespace NS] [--pair P ...] [--once] [--interval S]

For each pair: best bid and best ask (exact decimals), spread, state (valid, resyncing,
stale, halted or empty; "absent" if bookd does not serve the pair) and age (time since
bookd received the pair's last update). Pairs and namespace default to the config file
(`--config`, default etc/krakenfeed.toml); flags win, and when both are given the config
is not read at all.

`--once` prints one table and exits 0, or exits 1 with one line on stderr when no bookd
runs in the namespace (no directory segment, a dead writer or a silent one). Without it
the table is refreshed every `--interval` seconds (default 1) until Ctrl-C, which exits
0. It only reads: segments are mapped read-only and never unlinked.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from bookd.layout import LayoutError, ShmError, directory_name
from bookd.reader import BookReader, BookSnapshot, DirectoryInfo, read_directory

COLUMNS = ("PAIR", "BID", "ASK", "SPREAD", "STATE", "AGE")


def _age(ns: int | None) -> str:
    if ns is None:
        return "-"
    s = ns / 1e9
    return f"{s * 1e3:.0f}ms" if s < 1 else f"{s:.1f}s" if s < 3600 else f"{s / 3600:.1f}h"


def _dec(value: object) -> str:
    return "-" if value is None else format(value, "f")


def row(pair: str, snap: BookSnapshot | None) -> tuple[str, ...]:
    if snap is None:
        return (pair, "-", "-", "-", "absent", "-")
    bid, ask = snap.best_bid, snap.best_ask
    return (pair, _dec(bid[0] if bid else None), _dec(ask[0] if ask else None),
            _dec(snap.spread), snap.state.word, _age(snap.age_ns))


def render(rows: Sequence[tuple[str, ...]]) -> str:
    table = [COLUMNS, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in table)


def _not_running(namespace: str, info: DirectoryInfo | None) -> str:
    if info is None:
        return (f"no bookd running in namespace {namespace!r} "
                f"(no /dev/shm/{directory_name(namespace)})")
    return f"no bookd running in namespace {namespace!r}: {info.stopped_reason}"


class Top:
    """The readers of one `top` session (kept across refreshes; they follow restarts)."""

    def __init__(self, namespace: str, pairs: Sequence[str]) -> None:
        self.namespace, self.pairs = namespace, list(pairs)
        self.readers: dict[str, BookReader] = {}

    def snapshot(self, pair: str) -> BookSnapshot | None:
        reader = self.readers.get(pair)
        if reader is None:
            try:
                reader = BookReader.attach(pair, timeout=0, namespace=self.namespace)
            except TimeoutError:
                return None
            self.readers[pair] = reader
        return reader.snapshot()

    def table(self) -> str:
        return render([row(p, self.snapshot(p)) for p in self.pairs])

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
        self.readers.clear()


def run_once(namespace: str, pairs: Sequence[str]) -> int:
    info = read_directory(namespace)
    if info is None or not info.alive:
        print(f"bookd.top: {_not_running(namespace, info)}", file=sys.stderr)
        return 1
    top = Top(namespace, pairs)
    try:
        print(top.table())
    finally:
        top.close()
    return 0


def run_loop(namespace: str, pairs: Sequence[str], interval: float) -> int:
    top = Top(namespace, pairs)
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    try:
        while True:
            info = read_directory(namespace)
            stamp = time.strftime("%H:%M:%S")
            if info is None or not info.alive:
                status = f"{stamp}  {_not_running(namespace, info)}"
            else:
                status = (f"{stamp}  namespace {namespace}  bookd pid {info.pid}  "
                          f"generation {info.generation}  heartbeat "
                          f"{_age(info.heartbeat_age_ns)} ago")
            # Readers attached earlier still show the final state bookd left behind.
            body = top.table() if info is not None or top.readers else ""
            sys.stdout.write(f"{clear}{status}\n{body}\n\n" if body else f"{clear}{status}\n\n")
            sys.stdout.flush()
            time.sleep(interval)
    finally:
        top.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bookd.top",
        description="Show bookd's books from shared memory: best bid/ask, spread, state "
                    "and age per pair.")
    ap.add_argument("--config", help="config file (default: etc/krakenfeed.toml or "
                                     "$KRAKENFEED_CONFIG); gives the default pairs and "
                                     "namespace")
    ap.add_argument("--namespace", help="shared-memory namespace (default: from the config)")
    ap.add_argument("--pair", action="append", dest="pairs", metavar="PAIR",
                    help="pair to show, e.g. BTC/USD (repeatable; default: the config's)")
    ap.add_argument("--once", action="store_true",
                    help="print once and exit (1 if no bookd runs in the namespace)")
    ap.add_argument("--interval", type=float, default=1.0,
                    help="seconds between refreshes (default 1)")
    args = ap.parse_args(argv)
    if not args.interval > 0:
        ap.error("--interval must be > 0")
    namespace, pairs = args.namespace, args.pairs
    if namespace is None or not pairs:
        from ingest.config import exit_on_config_error

        cfg = exit_on_config_error(args.config, "bookd.top")
        namespace = namespace or cfg.namespace
        pairs = pairs or list(cfg.trading.pairs)
    try:
        if args.once:
            return run_once(namespace, pairs)
        return run_loop(namespace, pairs, args.interval)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (LayoutError, ShmError, ValueError, PermissionError) as e:
        print(f"bookd.top: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
