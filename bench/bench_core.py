"""The book core's cost per update, against the seed's design, in one run (issue 9).

In-process, no network: book frames as bytes, from the python-kraken-sdk fixture
(BTC/USD depth 10, 510 messages, precision 1/8) and from a synthetic depth-10 stream
generated here with a fixed seed. For each stream:

  (a) convert   wire.decode_book alone: typed decode + exact ticks (fast path + guard)
  (a') exact    the exact Raw route alone (what a frame costs when the guard trips)
  (b) core      decode_book + Book.apply (apply, truncate, checksum) + compare checksum
  (c) seed      json.loads(parse_float=Decimal) + SortedDict books + truncation +
                f-string checksum + compare (bench/seed_baseline.py)
  (d) checksum  Book.checksum() on a depth-10 book
  (e) apply     per level: (Book.apply over pre-decoded updates - checksum per message)
                / levels

Both (b) and (c) are first checked to verify every checksum of the stream. Each figure is
the median of --reps repetitions (time.perf_counter_ns); compare ratios within one run,
not absolute times across runs (PERFORMANCE.md "Noise").

    .venv/bin/python bench/bench_core.py [--reps 15] [--synthetic 5000] [--json]

`--json` prints one JSON object last. No assertions (CONVENTIONS.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import zlib
from pathlib import Path
from time import perf_counter_ns

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from seed_baseline import SeedBooks  # noqa: E402

from bookd.book import Book  # noqa: E402
from ingest import wire  # noqa: E402
from ingest.wire import decode_book  # noqa: E402

SDK_FIXTURE = (ROOT.parent / "shared" / "kraken" / "vectors"
               / "python_kraken_sdk_orderbook_v2_btcusd.jsonl")


class Stream:
    def __init__(self, name: str, frames: list[bytes], symbol: str, depth: int,
                 pp: int, qp: int) -> None:
        self.name = name
        self.frames = frames
        self.symbol = symbol
        self.depth = depth
        self.precisions = {symbol: (pp, qp)}


def load_jsonl(path: Path) -> Stream:
    """A vector file: `{"_meta":..}` line, then one raw frame per line (kept as bytes)."""
    lines = [ln.strip() for ln in path.read_bytes().splitlines() if ln.strip()]
    meta = json.loads(lines[0]).get("_meta", {})
    frames = lines[1:] if meta else lines
    return Stream(path.name, frames, meta.get("symbol", "BTC/USD"), meta.get("depth", 10),
                  meta.get("price_precision", 1), meta.get("qty_precision", 8))


# --------------------------------------------------------------------------------------
# a synthetic depth-10 stream with Kraken's semantics (refill after a delete inside the
# top 10, no delete for a level pushed out by an insert, 1-3 changes per message)

def synthetic(n: int, seed: int = 1, depth: int = 10) -> Stream:
    rng = random.Random(seed)
    pp, qp = 1, 8
    mid = 300_000  # 30000.0 at 1 decimal
    bids = {mid - 1 - 2 * i: rng.randint(1, 10**9) for i in range(40)}
    asks = {mid + 1 + 2 * i: rng.randint(1, 10**9) for i in range(40)}

    def top(side: dict, is_bid: bool) -> list[int]:
        return sorted(side, reverse=is_bid)[:depth]

    def token(ticks: int, p: int) -> str:
        s = str(ticks).rjust(p + 1, "0")
        return f"{s[:-p]}.{s[-p:]}"

    def render(levels: list[tuple[int, int]]) -> str:
        return ",".join(f'{{"price":{token(p, pp)},"qty":{token(q, qp)}}}' for p, q in levels)

    def crc() -> int:
        a = "".join(f"{p}{asks[p]}" for p in top(asks, False)[:10])
        b = "".join(f"{p}{bids[p]}" for p in top(bids, True)[:10])
        return zlib.crc32((a + b).encode())

    def frame(kind: str, b: list, a: list, i: int) -> bytes:
        ts = f"2026-08-16T23:{(i // 60_000_000) % 60:02d}:{(i // 1_000_000) % 60:02d}.{i % 1_000_000:06d}Z"
        return (f'{{"channel":"book","type":"{kind}","data":[{{"symbol":"BTC/USD",'
                f'"bids":[{render(b)}],"asks":[{render(a)}],"checksum":{crc()},'
                f'"timestamp":"{ts}"}}]}}').encode()

    frames = [frame("snapshot", [(p, bids[p]) for p in top(bids, True)],
                    [(p, asks[p]) for p in top(asks, False)], 0)]
    for i in range(1, n + 1):
        is_bid = rng.random() < 0.5
        side = bids if is_bid else asks
        out: list[tuple[int, int]] = []
        for _ in range(rng.choice((1, 1, 2, 3))):
            t = top(side, is_bid)
            r = rng.random()
            if r < 0.5:  # quantity change inside the top 10
                p = rng.choice(t)
                side[p] = rng.randint(1, 10**9)
                out.append((p, side[p]))
            elif r < 0.75:  # delete inside the top 10, then Kraken's refill
                p = rng.choice(t)
                del side[p]
                out.append((p, 0))
                p10 = top(side, is_bid)[-1]
                out.append((p10, side[p10]))
            else:  # insert inside the top 10 (the 10th falls out silently)
                lo, hi = ((t[-1] + 1, min(asks) - 1) if is_bid else (max(bids) + 1, t[-1] - 1))
                p = rng.randint(lo, hi) if lo <= hi else None
                if p is None or p in side:
                    continue
                side[p] = rng.randint(1, 10**9)
                out.append((p, side[p]))
            while len(side) < 30:  # keep the true book deep
                far = (min(side) - rng.randint(1, 3)) if is_bid else (max(side) + rng.randint(1, 3))
                side[far] = rng.randint(1, 10**9)
        if out:
            frames.append(frame("update", out if is_bid else [], [] if is_bid else out, i))
    return Stream(f"synthetic depth-10 (seed {seed})", frames, "BTC/USD", depth, pp, qp)


# --------------------------------------------------------------------------------------
# timing

def medians_us(cases: dict, reps: int) -> dict[str, float]:
    """Median microseconds per unit of each case: {name: (fn, loops, units per fn call)}.

    Repetitions are interleaved (one timing of every case per round), so a burst of load
    on this shared machine hits all cases alike instead of one case's every repetition.
    """
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, (fn, loops, units) in cases.items():
            gc.collect()
            t0 = perf_counter_ns()
            for _ in range(loops):
                fn()
            times[name].append((perf_counter_ns() - t0) / loops / units / 1000)
    return {name: statistics.median(v) for name, v in times.items()}


def core_pass(s: Stream) -> int:
    """Our core over the stream from fresh books: decode with exact ticks, apply,
    truncate, checksum, compare; returns the number of mismatches."""
    books = {sym: Book(sym, s.depth, *p) for sym, p in s.precisions.items()}
    precisions = s.precisions
    bad = 0
    for f in s.frames:
        for u in decode_book(f, precisions):
            if books[u.symbol].apply(u.snapshot, u.bids, u.asks) != u.checksum:
                bad += 1
    return bad


def bench_stream(s: Stream, reps: int) -> dict:
    frames = s.frames
    precisions = s.precisions
    n = len(frames)
    depth = s.depth
    pp, qp = precisions[s.symbol]
    exact_route = wire._decode_book_exact

    def convert():
        for f in frames:
            decode_book(f, precisions)

    def exact():
        for f in frames:
            exact_route(f, precisions)

    guard = wire._fast_path_allowed
    typed = wire._book_dec_f.decode

    def guard_only():
        for f in frames:
            guard(f)

    def typed_only():
        for f in frames:
            typed(f)

    def core():
        return core_pass(s)

    def seed():
        books = SeedBooks(depth, precisions)
        for f in frames:
            books.on_frame(f)
        return books

    # correctness first: both must verify every checksum of the stream
    bad = core()
    sb = seed()
    updates = [u for f in frames for u in decode_book(f, precisions)]
    levels = sum(len(u.bids) + len(u.asks) for u in updates)  # snapshot levels included
    upd_levels = sum(len(u.bids) + len(u.asks) for u in updates if not u.snapshot)
    n_upd = sum(1 for u in updates if not u.snapshot)
    fast = sum(1 for f in frames if wire._fast_path_allowed(f))

    def apply_only():
        book = Book(s.symbol, depth, pp, qp)
        for u in updates:
            book.apply(u.snapshot, u.bids, u.asks)

    book = Book(s.symbol, depth, pp, qp)
    for u in updates:
        book.apply(u.snapshot, u.bids, u.asks)
    k = 20_000

    def checksum():
        c = book.checksum
        for _ in range(k):
            c()

    loops = max(1, 20_000 // n)
    t = medians_us({
        "convert": (convert, loops, n), "exact": (exact, loops, n),
        "guard": (guard_only, loops, n), "typed": (typed_only, loops, n),
        "core": (core, loops, n), "seed": (seed, max(1, loops // 4), n),
        "checksum": (checksum, 1, k), "apply": (apply_only, loops, len(updates)),
    }, reps)
    t_convert, t_exact, t_guard, t_typed = t["convert"], t["exact"], t["guard"], t["typed"]
    t_core, t_seed, t_checksum, t_apply_msg = t["core"], t["seed"], t["checksum"], t["apply"]
    t_level = max(0.0, t_apply_msg - t_checksum) * len(updates) / levels
    return {
        "stream": s.name, "messages": n,
        "levels_per_update": round(upd_levels / max(1, n_upd), 3),
        "fast_path_frames": fast, "core_ok": f"{len(updates) - bad}/{len(updates)}",
        "seed_ok": f"{sb.checked - sb.mismatches}/{sb.checked}",
        "convert_us_per_update": t_convert, "exact_route_us_per_update": t_exact,
        "guard_us_per_update": t_guard, "typed_decode_us_per_update": t_typed,
        "core_us_per_update": t_core, "seed_core_us_per_update": t_seed,
        "core_ratio_vs_seed": t_seed / t_core, "convert_ratio_exact_vs_fast": t_exact / t_convert,
        "checksum_us": t_checksum, "apply_us_per_message": t_apply_msg,
        "apply_us_per_level": t_level,
    }


def print_table(r: dict) -> None:
    print(f"\n{r['stream']}: {r['messages']} messages, {r['levels_per_update']} levels per "
          f"update, {r['fast_path_frames']} frames pass the fast-path guard; checksums "
          f"verified: core {r['core_ok']}, seed {r['seed_ok']}")
    rows = [
        ("(a)  convert: decode_book (typed + exact ticks)", r["convert_us_per_update"]),
        ("     of which: frame guard (translate + run search)", r["guard_us_per_update"]),
        ("     of which: typed float decode (msgspec)", r["typed_decode_us_per_update"]),
        ("(a') exact Raw route alone", r["exact_route_us_per_update"]),
        ("(b)  core: decode + apply + truncate + checksum", r["core_us_per_update"]),
        ("(c)  seed: json/Decimal + SortedDict + f-string", r["seed_core_us_per_update"]),
        ("(d)  checksum alone (depth 10)", r["checksum_us"]),
        ("     Book.apply per message (pre-decoded)", r["apply_us_per_message"]),
        ("(e)  apply per level: (apply - checksum) / levels", r["apply_us_per_level"]),
    ]
    for name, us in rows:
        print(f"  {name:<52} {us:8.3f} us")
    print(f"  {'ratio seed / core (b vs c)':<52} {r['core_ratio_vs_seed']:8.2f} x")
    print(f"  {'ratio exact route / convert':<52} {r['convert_ratio_exact_vs_fast']:8.2f} x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15, help="repetitions; the median is reported")
    ap.add_argument("--synthetic", type=int, default=5000, help="synthetic updates (0: skip)")
    ap.add_argument("--seed", type=int, default=1, help="synthetic stream seed")
    ap.add_argument("--fixture", type=Path, default=SDK_FIXTURE)
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    args = ap.parse_args(argv)

    print(f"bench_core: Python {sys.version.split()[0]}, medians of {args.reps} reps, "
          "in-process, no network")
    fixture = bench_stream(load_jsonl(args.fixture), args.reps)
    print_table(fixture)
    result = {k: fixture[k] for k in (
        "core_us_per_update", "seed_core_us_per_update", "core_ratio_vs_seed",
        "convert_us_per_update", "checksum_us", "apply_us_per_level",
        "exact_route_us_per_update", "guard_us_per_update", "typed_decode_us_per_update",
        "core_ok", "seed_ok")}
    result["stream"] = fixture["stream"]
    if args.synthetic:
        syn = bench_stream(synthetic(args.synthetic, args.seed), args.reps)
        print_table(syn)
        result["synthetic"] = {k: v for k, v in syn.items() if k != "stream"}
    if args.json:
        print(json.dumps(result, default=lambda x: round(x, 4)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
