"""Benchmark of bookd's shared memory: publish cost and reader throughput.

    .venv/bin/python bench/bench_shm.py [--seconds 2] [--depths 10 100]

Prints, per depth:
* publish cost in microseconds (`BookWriter.publish` of a full book, of a half-full
  book, and `set_state`, `heartbeat`), best and median of several timeit runs;
* single-process reader rates: raw seqlock reads/s (`SeqlockReader.read`, a validated
  bytes copy of the payload), `BookReader.read_payload()`/s, `snapshot()`/s and
  zero-copy `view().consistent(best level)`/s;
* the same reader rates while a writer in another process publishes flat out, with the
  writer's rate, the reader's seqlock retries and a torn-read check (every value the
  writer publishes encodes its write counter; a reader that accepts a mix counts it).

Figures only, no pass/fail: the machines are shared and noisy (PERFORMANCE.md), so
compare ratios within one run. Uses its own namespace and removes it on exit.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
import timeit
import uuid
from pathlib import Path

try:
    import bookd  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bookd.layout import BookState, SeqlockBusy  # noqa: E402
from bookd.reader import BookReader  # noqa: E402
from bookd.shm import BookWriter, unlink_namespace  # noqa: E402

PAIR = "BTC/USD"


def _book(depth: int, k: int = 1) -> tuple[list[int], list[int], list[int], list[int]]:
    return ([5_000_000_000 - i for i in range(depth)], [k + i for i in range(depth)],
            [5_000_000_001 + i for i in range(depth)], [k + 7 + i for i in range(depth)])


def _time(fn, number: int, repeat: int = 7) -> tuple[float, float]:
    runs = [t / number * 1e6 for t in timeit.repeat(fn, number=number, repeat=repeat)]
    return min(runs), statistics.median(runs)


def _rate(fn, seconds: float, tick=None) -> float:
    """Calls of fn per second; `tick` (the in-process writer's heartbeat) every 256."""
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        for _ in range(256):
            fn()
        n += 256
        if tick is not None:
            tick()
    return n / (time.perf_counter() - t0)


def bench_publish(ns: str, depth: int) -> None:
    with BookWriter(ns, [PAIR], depth) as w:
        w.set_precision(0, 1, 8)
        bp, bq, ap, aq = _book(depth)
        half = depth // 2
        hb, hq, ha, haq = bp[:half], bq[:half], ap[:half], aq[:half]
        n = 100_000 if depth <= 10 else 20_000

        def full() -> None:
            w.publish(0, bp, bq, ap, aq, checksum=123456789, exchange_ts_ns=1, recv_ns=2)

        def partial() -> None:
            w.publish(0, hb, hq, ha, haq, checksum=123456789, exchange_ts_ns=1, recv_ns=2)

        geo = w._writers[0]
        scratch, pack = bytearray(len(geo.scratch)), geo.pack

        def bare_pack() -> None:  # reference: the struct work alone, no seqlock, no checks
            pack(scratch, 0, 1, depth, depth, 123456789, 1, 2, 3, *bp, *bq, *ap, *aq)

        for name, fn in (("publish full book", full), (f"publish {half}/{depth} levels", partial),
                         ("(ref: bare pack_into)", bare_pack),
                         ("set_state", lambda: w.set_state(0, BookState.VALID)),
                         ("heartbeat", w.heartbeat)):
            best, med = _time(fn, n)
            print(f"  depth {depth:4d}  {name:<24} best {best:6.2f} us   median {med:6.2f} us")


def _reader_rates(reader: BookReader, seconds: float, check: bool,
                  tick=None) -> dict[str, float]:
    lock = reader._current()[0].lock  # the bare seqlock copy, below the API
    busy = [0]

    def raw_read() -> None:
        try:
            lock.read(100)
        except SeqlockBusy:  # the writer process was descheduled mid-write
            busy[0] += 1
            os.sched_yield()

    def snap_checked() -> None:
        s = reader.snapshot()
        if check and s.exchange_ts_ns > 1 and (s.recv_ns != s.exchange_ts_ns
                                               or int(s.bids[-1, 1]) != s.exchange_ts_ns):
            torn.append(s)

    def view_best() -> None:
        with reader.view() as v:
            v.consistent(lambda v: (int(v.bid_prices[0]), int(v.ask_prices[0])))

    torn: list = []
    rates = {
        "raw seqlock read (bytes copy)": _rate(raw_read, seconds, tick),
        "read_payload()": _rate(reader.read_payload, seconds, tick),
        "snapshot()": _rate(snap_checked, seconds, tick),
        "view() + consistent(best)": _rate(view_best, seconds, tick),
    }
    rates["torn snapshots accepted"] = len(torn)
    return rates


def _flat_out(ns: str, depth: int, ready, stop, out) -> None:
    w = BookWriter(ns, [PAIR], depth)
    try:
        w.set_precision(0, 1, 8)
        bp, bq, ap, aq = _book(depth)
        ready.set()
        k = 1
        t0 = time.perf_counter()
        while not stop.is_set():
            for _ in range(256):
                k += 1
                bq[-1] = k  # the last bid qty and both timestamps encode the write counter
                w.publish(0, bp, bq, ap, aq, checksum=k & 0xFFFFFFFF, exchange_ts_ns=k,
                          recv_ns=k)
            w.heartbeat()
        out.put(k / (time.perf_counter() - t0))
    finally:
        w.close()


def bench_readers(ns: str, depth: int, seconds: float) -> None:
    with BookWriter(ns, [PAIR], depth) as w:
        w.set_precision(0, 1, 8)
        w.publish(0, *_book(depth), checksum=1, exchange_ts_ns=1, recv_ns=1)
        w.heartbeat()
        with BookReader.attach(PAIR, namespace=ns) as reader:
            quiet = _reader_rates(reader, seconds / 4, check=False, tick=w.heartbeat)
    ctx = mp.get_context("fork")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_flat_out, args=(ns, depth, ready, stop, out))
    proc.start()
    try:
        ready.wait(30)
        with BookReader.attach(PAIR, namespace=ns, timeout=10) as reader:
            busy = _reader_rates(reader, seconds / 4, check=True)
            retries = reader.retries
        stop.set()
        writes = out.get(timeout=30)
    finally:
        stop.set()
        proc.join(10)
    print(f"  depth {depth:4d}  reader, same process idle writer | with a writer process "
          f"flat out ({writes / 1e3:.0f} k publishes/s)")
    for key in quiet:
        if key.startswith("torn"):
            continue
        print(f"    {key:<32} {quiet[key] / 1e6:6.2f} M/s | {busy[key] / 1e6:6.2f} M/s")
    print(f"    seqlock retries under load: {retries}; torn snapshots accepted: "
          f"{busy['torn snapshots accepted']:.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0,
                    help="seconds per reader measurement set (default 2)")
    ap.add_argument("--depths", type=int, nargs="+", default=[10, 100])
    args = ap.parse_args(argv)
    ns = f"bench{os.getpid()}_{uuid.uuid4().hex[:6]}"
    print(f"bench_shm: python {sys.version.split()[0]}, {os.cpu_count()} cpus, "
          f"load {os.getloadavg()[0]:.2f}, namespace {ns}")
    try:
        print("publish cost (BookWriter, one pack_into + one seqlock memcpy):")
        for depth in args.depths:
            bench_publish(ns, depth)
        print("reader throughput:")
        for depth in args.depths:
            bench_readers(ns, depth, args.seconds)
    finally:
        unlink_namespace(ns, [PAIR])
    return 0


if __name__ == "__main__":
    sys.exit(main())
