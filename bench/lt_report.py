"""bench/loadtest.py's outputs: the table with ratios, the two PNGs, the summary line."""

from __future__ import annotations

import math
from pathlib import Path


def _f(x, fmt: str = ",.0f", none: str = "-") -> str:  # noqa: ANN001
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, fmt)


def _ratio(a, b) -> str:  # noqa: ANN001
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"


def table(r: dict) -> str:
    s = r["summary"]
    m = r["machine"]
    core = r.get("core", {})
    fx = core.get("fixture", {})
    sy = core.get("synthetic", {})
    lines = [
        "",
        f"krakenfeed load test ({'bench-quick' if r['quick'] else 'bench'}"
        f"{', EXPERIMENT: bookd publishes book events itself' if r.get('direct_books') else ''}"
        f"): {m['cpus']} CPUs "
        f"({m['cpu_model']}), {m['memory']}, Python {m['python']}; load average "
        f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end "
        f"(1 min; shared VM: figures are noisy)",
        "",
        f"{'':<52}{'ours':>12}{'seed':>12}{'pks':>12}{'ours/seed':>11}{'ours/pks':>10}",
        f"{'end to end, depth 10, sustained (book msgs/s)':<52}"
        f"{_f(s['pipeline_msgs_per_s']):>12}{_f(s['seed_baseline_msgs_per_s']):>12}"
        f"{_f(s['pks_msgs_per_s']):>12}"
        f"{_ratio(s['pipeline_msgs_per_s'], s['seed_baseline_msgs_per_s']):>11}"
        f"{_ratio(s['pipeline_msgs_per_s'], s['pks_msgs_per_s']):>10}",
        f"{'  burst ceiling, --speed max (delivered msgs/s)':<52}"
        f"{_f(s.get('burst_msgs_per_s')):>12}{'':>12}{'':>12}"
        f"{_ratio(s.get('burst_msgs_per_s'), s['seed_baseline_msgs_per_s']):>11}"
        f"{_ratio(s.get('burst_msgs_per_s'), s['pks_msgs_per_s']):>10}",
        f"{'core per update, pks fixture (us)':<52}"
        f"{_f(fx.get('core_us_per_update'), '.2f'):>12}"
        f"{_f(fx.get('seed_core_us_per_update'), '.2f'):>12}"
        f"{_f(fx.get('pks_core_us_per_update'), '.2f'):>12}"
        f"{_ratio(fx.get('seed_core_us_per_update'), fx.get('core_us_per_update')):>11}"
        f"{_ratio(fx.get('core_ratio_vs_pks'), 1):>10}",  # timed side by side
        f"{'core per update, synthetic depth 10 (us)':<52}"
        f"{_f(sy.get('core_us_per_update'), '.2f'):>12}"
        f"{_f(sy.get('seed_core_us_per_update'), '.2f'):>12}"
        f"{_f(sy.get('pks_core_us_per_update'), '.2f'):>12}"
        f"{_ratio(sy.get('seed_core_us_per_update'), sy.get('core_us_per_update')):>11}"
        f"{_ratio(sy.get('core_ratio_vs_pks'), 1):>10}",  # timed side by side
        f"{'checksum, depth 10 (us)':<52}{_f(s.get('checksum_us'), '.3f'):>12}",
        f"{'checksum mismatches (pipeline / seed / pks / core)':<52}"
        f"{_f(s.get('pipeline_mismatches'), 'd'):>12}"
        f"{_f(s.get('seed_mismatches'), 'd'):>12}{_f(s.get('pks_mismatches'), 'd'):>12}"
        f"{'core ' + str(s.get('core_mismatches', '-')):>21}",
        "",
        f"latency ingest receive -> subscriber at {_f(s.get('latency_rate'))} msgs/s "
        f"(depth 10): p50 {_f(s['p50_us'])} us, p99 {_f(s['p99_us'])} us, p99.9 "
        f"{_f(s.get('p999_us'))} us, max {_f(s.get('latency_max_us'))} us "
        f"({_f(s.get('latency_n'))} events)",
        f"latency ingest receive -> shared memory at the same rate: p50 "
        f"{_f(s.get('shm_lag_p50_us'))} us, p99 {_f(s.get('shm_lag_p99_us'))} us (bookd's "
        f"publish lag over its last 1 s stats interval in that window, "
        f"{_f(s.get('shm_lag_samples'))} samples)",
        f"reader snapshots/s (BookReader.snapshot under load): "
        f"{_f(s.get('reader_snapshots_per_s'))}, torn accepted: "
        f"{_f(s.get('reader_torn'), 'd')}, state valid in "
        f"{_f((s.get('reader_valid_share') or 0) * 100, '.1f')}% of them",
        "",
        f"{'scenario':<9}{'step':<8}{'nominal':>9}{'offered':>10}{'delivered':>10}"
        f"{'sent':>10}{'lost':>8}{'mism':>5}{'p50 us':>11}{'p99 us':>11}  {'held':<5}"
        f"cpu us/msg replay/ingest/bookd/bus/sub",
    ]
    for sc in r["scenarios"].values():
        for st in sc.get("steps", []):
            lat = st.get("latency", {})
            cpu = st.get("cpu_us_per_msg", {})
            cpus = "/".join(_f(cpu.get(k), ".1f") for k in
                            ("replay", "ingest", "bookd", "bus", "subscriber"))
            lines.append(
                f"{sc['name']:<9}{st['label']:<8}{_f(st.get('nominal_msgs_per_s')):>9}"
                f"{_f(st.get('offered_msgs_per_s')):>10}{_f(st.get('delivered_msgs_per_s')):>10}"
                f"{_f(st.get('sent')):>10}{_f(st.get('lost')):>8}"
                f"{_f(st.get('mismatches'), 'd'):>5}{_f(lat.get('p50_us')):>11}"
                f"{_f(lat.get('p99_us')):>11}  {'yes' if st.get('held') else 'no':<5}{cpus}")
        for err in sc.get("errors", []):
            lines.append(f"{sc['name']:<9}error: {err}")
    lines.append("")
    lines.append(f"{'scenario':<9}{'sustained':>11}{'burst':>10}{'burst lost':>11}   "
                 "peak RSS MB (replay, ingest, bookd, bus, subscriber)")
    for sc in r["scenarios"].values():
        rss = sc.get("peak_rss_mb", {})
        sus = sc.get("sustained_msgs_per_s")
        lines.append(f"{sc['name']:<9}{'none held' if sus == 0 else _f(sus):>11}"
                     f"{_f(sc.get('burst_msgs_per_s')):>10}{_f(sc.get('burst_lost')):>11}   "
                     + ", ".join(f"{k} {_f(rss.get(k), '.0f')}" for k in
                                 ("replay", "ingest", "bookd", "bus", "subscriber")))
    b = r.get("baselines", {})
    for k in ("seed", "pks"):
        x = b.get(k, {})
        if x:
            lines.append(f"baseline {k:<5}: {_f(x.get('msgs_per_s'))} msgs/s over "
                         f"{_f(x.get('messages'))} messages, {_f(x.get('mismatches'), 'd')} "
                         f"mismatches, {_f(x.get('cpu_us_per_msg'), '.1f')} us CPU/msg, peak "
                         f"RSS {_f(x.get('peak_rss_mb'), '.0f')} MB"
                         + (f"  ERROR {x['error']}" if x.get("error") else ""))
    if s.get("invalid"):
        lines.append(f"RUN INVALID: {s['invalid']}")
    return "\n".join(lines)


def plots(r: dict, latency_raw: list[int], samples: list, out_dir: Path) -> list[str]:
    """latency_hist.png and throughput.png (matplotlib, Agg). Returns the files written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return []
    written = []
    s = r["summary"]
    if latency_raw:
        a = np.asarray(latency_raw, dtype=float)
        a = np.clip(a, 1, None)
        fig, ax = plt.subplots(figsize=(9, 5))
        bins = np.logspace(np.log10(a.min()), np.log10(a.max()) + 0.01, 80)
        ax.hist(a, bins=bins, color="#3b75af")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for q, name, col in ((50, "p50", "green"), (99, "p99", "orange"),
                             (99.9, "p99.9", "red")):
            v = float(np.percentile(a, q))
            ax.axvline(v, color=col, linestyle="--", label=f"{name} {v:,.0f} us")
        ax.set_xlabel("latency, ingest receive -> bus subscriber receive (us)")
        ax.set_ylabel("events")
        ax.set_title(f"krakenfeed end-to-end latency at {s.get('latency_rate', 0):,.0f} "
                     f"book msgs/s, depth 10 ({a.size:,} events)")
        ax.legend()
        fig.tight_layout()
        p = out_dir / "latency_hist.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(str(p))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 8), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 2]})
    t0 = r.get("_t0_unix_ns", 0)
    colors = {"d10": "#3b75af", "d100": "#e1812c", "p100": "#3a923a"}
    for name, sc in r["scenarios"].items():
        b = sc.get("buckets") or []
        if not b:
            continue
        xs = [(k * 100_000_000 - t0) / 1e9 for k, _ in b]
        ys = [v * 10 for _, v in b]
        ax1.plot(xs, ys, lw=0.8, color=colors.get(name), label=f"{name} ({sc['title']})")
        for st in sc.get("steps", []):
            if "t_window_unix" in st:
                x = (st["t_window_unix"] - t0) / 1e9
                ax1.annotate(st["label"], (x, 0), xytext=(0, 4), textcoords="offset points",
                             fontsize=7, rotation=90, va="bottom")
    ax1.set_ylabel("L2 events/s at the subscriber (100 ms bins)")
    ax1.legend(loc="upper right", fontsize=8)
    ax1.set_title("krakenfeed load test: throughput over time and memory of each process")
    roles = sorted({s[1] for s in samples} - {"synthetic", "reader"})
    wall0 = r.get("_children_t0_unix_ns", t0)
    for role in roles:
        pts = [(t + (wall0 - t0) / 1e9, kb / 1024) for t, rl, kb, _ in samples if rl == role]
        if pts:
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], ".", ms=2, label=role)
    ax2.set_ylabel("RSS (MB)")
    ax2.set_xlabel("seconds since the load test started")
    ax2.legend(loc="upper left", fontsize=8, ncol=4)
    fig.tight_layout()
    p = out_dir / "throughput.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    written.append(str(p))
    return written
