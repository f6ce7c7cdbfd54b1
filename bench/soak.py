"""`make soak`: the system on the synthetic market at a fixed rate for a long time.

Runs bus, bookd, ingest, the bench subscriber and the replay server (a looped synthetic
recording at `--rate` book msgs/s) on a private namespace, and every `--interval`
seconds samples each process's RSS (/proc), the latency of that interval at the
subscriber (p50/p99 from ingest receive to subscriber receive), the bus/bookd/ingest
counters from their StatsEvents (drops, resyncs, mismatches) and the subscriber's
seq gaps. At the end it fits a line through each process's RSS after the warm-up and
reports its growth per hour (percent of the post-warm-up size; also fitted over the
second half alone, which a one-off step does not skew), writes
bench/results/soak.json and bench/results/soak.png, and prints one JSON line last.

    .venv/bin/python bench/soak.py [--seconds 1800] [--rate 10000] [--interval 5]
    make soak                       # 30 minutes
    make soak SOAK_S=120            # a try

Target (issue 14): RSS flat, under 5% growth per hour after warm-up. A figure, never
an assertion. Nothing is left behind (processes, segments, temp dirs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lt_pipeline import Pipeline  # noqa: E402
from lt_procs import Children, machine_info, make_recordings, rss_kb  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SYSTEM = ("ingest", "bookd", "bus")


def growth_per_hour(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(slope in units/hour, growth in % of the first fitted value per hour), least squares."""
    n = len(points)
    if n < 3:
        return 0.0, 0.0
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    slope = sum((t - mt) * (v - mv) for t, v in points) / var if var else 0.0
    start = mv + slope * (points[0][0] - mt)
    return slope * 3600, (slope * 3600 / start * 100) if start else 0.0


def plot(samples: list[dict], roles: list[str], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    t = [s["t"] / 60 for s in samples]
    for role in roles:
        ax1.plot(t, [s["rss_mb"].get(role, float("nan")) for s in samples], label=role)
    ax1.set_ylabel("RSS (MB)")
    ax1.legend(loc="upper left", fontsize=8)
    ax2.plot(t, [s["p50_us"] / 1000 for s in samples], label="p50")
    ax2.plot(t, [s["p99_us"] / 1000 for s in samples], label="p99")
    ax2.set_ylabel("latency (ms)")
    ax2.set_xlabel("minutes")
    ax2.legend(loc="upper left", fontsize=8)
    fig.suptitle("krakenfeed soak")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float,
                    default=float(os.environ.get("SOAK_S") or 1800), help="duration (SOAK_S)")
    ap.add_argument("--rate", type=float, default=10000, help="book msgs/s offered")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--depth", type=int, default=10)
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds excluded from the growth fit (default: 20%% of the run, "
                         "at most 300)")
    args = ap.parse_args(argv)
    if args.seconds < 3 * args.interval or args.rate <= 0 or args.interval <= 0:
        ap.error("--seconds must cover at least three intervals; --rate, --interval > 0")
    warmup = args.warmup if args.warmup is not None else min(300.0, 0.2 * args.seconds)
    RESULTS.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kfsoak"))
    children = Children(work)
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    load0 = os.getloadavg()[0]
    # A recording of about 60 s at the rate, looped by the server.
    rec = make_recordings({"soak": (args.pairs, args.depth, args.rate,
                                    int(args.rate * 60))}, children, log)["soak"]
    pipe = Pipeline(children, "soak", rec.symbols, args.depth, log)
    samples: list[dict] = []
    final: dict = {}
    try:
        pipe.start()
        replay, _endpoint = pipe._start_replay(rec, "1", loop=True)
        pipe.replay = replay
        sub = pipe.sub
        deadline = time.monotonic() + 60
        conn = None
        while conn is None:
            per = sub.get()["per_conn"]
            conn = next((k for k, v in per.items() if v[0] > 0), None)
            if conn is None:
                if time.monotonic() > deadline:
                    raise TimeoutError("no events within 60 s: " +
                                       pipe.procs["ingest"].log_text()[-500:])
                time.sleep(0.1)
        roles = {"replay": replay, **pipe.procs}
        t0 = time.monotonic()
        g_prev = sub.get()
        sub.request(cmd="window", on=True)
        log(f"soak: {args.rate:,.0f} msgs/s for {args.seconds:,.0f} s, sampling every "
            f"{args.interval:g} s (load {load0:.2f})")
        while time.monotonic() - t0 < args.seconds:
            time.sleep(args.interval)
            w = sub.request(cmd="window", on=False)["window"]
            sub.request(cmd="window", on=True)
            g = sub.get()
            t = time.monotonic() - t0
            stats = {p: s.get("counters", {}) for p, s in g["stats"].items()}
            sample = {
                "t": round(t, 1),
                "rss_mb": {r: round((rss_kb(c.pid) or 0) / 1024, 1) for r, c in roles.items()},
                "delivered_per_s": round((g["total"] - g_prev["total"]) / args.interval),
                "p50_us": w.get("p50_us", 0.0), "p99_us": w.get("p99_us", 0.0),
                "seq_gaps": g["seq_gaps"], "mismatches": g["mismatches"],
                "drops_bookd": stats.get("ingest", {}).get("drops_bookd", 0),
                "drops_bus": stats.get("bookd", {}).get("drops_bus", 0),
                "resyncs": stats.get("bookd", {}).get("resyncs", 0),
                "bookd_mismatches": stats.get("bookd", {}).get("mismatches", 0),
            }
            samples.append(sample)
            g_prev = g
            rss = " ".join(f"{r} {v:.0f}" for r, v in sample["rss_mb"].items())
            log(f"  {t:7.0f} s  {sample['delivered_per_s']:>7,}/s  p50 "
                f"{sample['p50_us'] / 1000:6.2f} ms  p99 {sample['p99_us'] / 1000:7.2f} ms  "
                f"RSS MB: {rss}  gaps {sample['seq_gaps']} drops {sample['drops_bookd']}")
        final = pipe.stop()
    finally:
        if pipe.sub is not None:
            pipe.stop()
        children.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    after = [s for s in samples if s["t"] >= warmup] or samples
    # The second half of the fitted window, fitted alone: a one-off step (the allocator's
    # high-water mark after a backlog during a host stall) inflates the whole window's
    # slope for good, while a leak shows in both fits. Both are reported.
    late = after[len(after) // 2:]
    growth = {}
    for role in samples[0]["rss_mb"] if samples else []:
        per_h, pct = growth_per_hour([(s["t"], s["rss_mb"][role]) for s in after])
        _, late_pct = growth_per_hour([(s["t"], s["rss_mb"][role]) for s in late])
        growth[role] = {"start_mb": after[0]["rss_mb"][role], "end_mb": after[-1]["rss_mb"][role],
                        "mb_per_hour": round(per_h, 2), "pct_per_hour": round(pct, 2),
                        "second_half_pct_per_hour": round(late_pct, 2)}
    last = samples[-1] if samples else {}
    summary = {
        "soak_seconds": args.seconds, "rate": args.rate, "samples": len(samples),
        "warmup_s": warmup,
        "rss_growth_pct_per_hour": {r: g["pct_per_hour"] for r, g in growth.items()},
        # The system's own processes; replay and the subscriber are the test's tools
        # (the replay server indexes its recording during the first loop).
        "max_rss_growth_pct_per_hour": max((g["pct_per_hour"] for r, g in growth.items()
                                            if r in SYSTEM), default=0.0),
        "max_second_half_growth_pct_per_hour": max(
            (g["second_half_pct_per_hour"] for r, g in growth.items() if r in SYSTEM),
            default=0.0),
        "p50_us_median": sorted(s["p50_us"] for s in samples)[len(samples) // 2] if samples else 0,
        "p99_us_max": max((s["p99_us"] for s in samples), default=0),
        "seq_gaps": last.get("seq_gaps", 0), "mismatches": last.get("mismatches", 0),
        "drops_bookd": last.get("drops_bookd", 0), "resyncs": last.get("resyncs", 0),
        "loadavg_start": round(load0, 2), "loadavg_end": round(os.getloadavg()[0], 2),
    }
    print(f"\nsoak: {len(samples)} samples over {args.seconds:,.0f} s at {args.rate:,.0f} msgs/s"
          f" (fit after {warmup:.0f} s of warm-up)")
    print(f"  {'process':<11} {'start MB':>9} {'end MB':>8} {'MB/h':>8} {'%/h':>7} "
          f"{'2nd half %/h':>13}")
    for role, g in growth.items():
        print(f"  {role:<11} {g['start_mb']:>9.1f} {g['end_mb']:>8.1f} {g['mb_per_hour']:>8.2f} "
              f"{g['pct_per_hour']:>7.2f} {g['second_half_pct_per_hour']:>13.2f}")
    print(f"  seq gaps {summary['seq_gaps']}, mismatches {summary['mismatches']}, "
          f"drops to bookd {summary['drops_bookd']}, resyncs {summary['resyncs']}")
    out = {"summary": summary, "growth": growth, "samples": samples, "final": final,
           "machine": machine_info()}
    (RESULTS / "soak.json").write_text(json.dumps(out, indent=1))
    if samples and plot(samples, list(growth), RESULTS / "soak.png"):
        print(f"  plot: {RESULTS / 'soak.png'}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
