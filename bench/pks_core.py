"""python-kraken-sdk's book core on the frames bench/bench_core.py times (issue 14).

The third column of the core comparison: the same streams as bench_core.py (the
python-kraken-sdk fixture, BTC/USD depth 10 at 1/8, and bench_core's synthetic depth-10
stream with the same seed), through `SpotOrderBookClient.on_message` without a socket:
`json.loads(frame)` (what the SDK's connector does with every frame) and `await
client.on_message(msg)` (float formatting of every level, a sort and OrderedDict rebuild
of the side per level, truncation, checksum on every update, `on_book_update`).
`Market.get_asset_pairs` is answered locally (bench/baseline_pks.py). The SDK does not
clear a book on a snapshot, so every repetition gets a fresh client (made before the
clock starts). The checksum verdicts are counted first: a mismatch invalidates the run.

Each repetition also times our core on the same frames (bench_core.core_pass), right
after the SDK's: `core_ratio_vs_pks` is the median of the per-repetition ratios, so a
burst of load on the shared machine hits both sides of a ratio alike (bench_core.py
runs in another process, at another moment).

    .venv/bin/python bench/pks_core.py [--reps 15] [--synthetic 5000] [--seed 1] [--json]

Reports the median over --reps of the time per book message. No assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
from pathlib import Path
from time import perf_counter_ns

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline_pks import make_client_class, patch_asset_pairs  # noqa: E402
from bench_core import SDK_FIXTURE, Stream, core_pass, load_jsonl, synthetic  # noqa: E402


def bench_stream(s: Stream, reps: int) -> dict:
    patch_asset_pairs(s.precisions)
    cls = make_client_class()
    frames = s.frames
    loads = json.loads
    loop = asyncio.new_event_loop()

    async def run(client) -> None:  # noqa: ANN001
        on_message = client.on_message
        for f in frames:
            await on_message(loads(f))

    async def make():  # noqa: ANN202 - the SDK's clients want a running loop
        return [cls(depth=s.depth) for _ in range(reps + 1)]

    made: list = []
    try:
        made = loop.run_until_complete(make())
        check, *clients = made
        loop.run_until_complete(run(check))
        if core_pass(s):
            raise SystemExit(f"{s.name}: our core found checksum mismatches")
        times, ours = [], []
        for client in clients:
            gc.collect()
            t0 = perf_counter_ns()
            loop.run_until_complete(run(client))
            times.append(perf_counter_ns() - t0)
            gc.collect()
            t0 = perf_counter_ns()
            core_pass(s)
            ours.append(perf_counter_ns() - t0)
    finally:
        async def close_all() -> None:
            for c in made:
                await c.close()
        loop.run_until_complete(close_all())
        loop.close()
    return {"stream": s.name, "messages": len(frames),
            "pks_ok": f"{check.bench_checked - check.bench_mismatches}/{check.bench_checked}",
            "pks_mismatches": check.bench_mismatches,
            "pks_messages_seen": check.bench_messages,
            "pks_core_us_per_update": statistics.median(times) / len(frames) / 1000,
            "ours_core_us_per_update": statistics.median(ours) / len(frames) / 1000,
            "core_ratio_vs_pks": statistics.median(t / o for t, o in zip(times, ours,
                                                                            strict=True))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--synthetic", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fixture", type=Path, default=SDK_FIXTURE)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    out = {"fixture": bench_stream(load_jsonl(args.fixture), args.reps)}
    if args.synthetic:
        out["synthetic"] = bench_stream(synthetic(args.synthetic, args.seed), args.reps)
    for r in out.values():
        print(f"{r['stream']}: python-kraken-sdk on_message {r['pks_core_us_per_update']:.3f} "
              f"us per message (ours in the same repetitions {r['ours_core_us_per_update']:.3f}, "
              f"ratio {r['core_ratio_vs_pks']:.2f}x); checksums verified {r['pks_ok']}")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
