"""Where the pipeline's time goes: py-spy on every process during one load step.

    pip install py-spy            # into the venv; not a project dependency
    .venv/bin/python bench/profile_pipeline.py [--rate 20000 | --max] [--seconds 15]
        [--scenario d10|d100|p100] [--out DIR] [--native]

Starts the same pipeline as bench/loadtest.py (replay, ingest, bookd, bus, subscriber on a
bench config), runs one step (a fixed rate or --speed max) and, during its measurement
window, `py-spy record --format raw --nonblocking` samples each process at 200 Hz. Then
prints, per process, the CPU it used per delivered message and its top functions by self
time and by inclusive time (share of that process's samples; idle samples, where the
process waits in poll/epoll, are counted separately). Raw collapsed stacks are kept in
--out (default $TMPDIR/krakenfeed-profile) for flame graphs (e.g. speedscope).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from loadtest import SCALES  # noqa: E402
from lt_pipeline import Pipeline  # noqa: E402
from lt_procs import Children, make_recordings  # noqa: E402

IDLE = ("poll (", "epoll_wait", "select (", "_poll (", "wait (", "sleep (", "zmq_poll",
        "run_forever", "_run_once (asyncio", "recv (zmq")


def parse(path: Path) -> tuple[Counter, Counter, int, int]:
    self_t: Counter = Counter()
    incl: Counter = Counter()
    total = idle = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        k = int(n)
        frames = stack.split(";")
        total += k
        leaf = frames[-1]
        if any(m in leaf for m in IDLE):
            idle += k
            continue
        self_t[leaf] += k
        for f in set(frames):
            incl[f] += k
    return self_t, incl, total, idle


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=int, default=20_000)
    ap.add_argument("--max", action="store_true", help="--speed max instead of --rate")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--scenario", default="d10", choices=("d10", "d100", "p100"))
    ap.add_argument("--out", type=Path,
                    default=Path(tempfile.gettempdir()) / "krakenfeed-profile")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    args = ap.parse_args(argv)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        print("py-spy is not installed: .venv/bin/python -m pip install py-spy")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kfprof"))
    children = Children(work)
    spies: dict[str, subprocess.Popen] = {}
    res: dict = {}
    try:
        spec = {args.scenario: SCALES["quick"]["recordings"][args.scenario]}
        rec = make_recordings(spec, children)[args.scenario]
        pipe = Pipeline(children, args.scenario, rec.symbols, rec.depth)
        pipe.start()

        def hook(procs: dict) -> None:
            for role, p in procs.items():
                cmd = [pyspy, "record", "--format", "raw", "--nonblocking", "-r", "200", "-d",
                       f"{args.seconds:g}", "-p", str(p.pid), "-o",
                       str(args.out / f"{role}.txt")]
                if args.native:
                    cmd.append("--native")
                spies[role] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL)

        speed = None if args.max else args.rate / rec.rate
        res = pipe.step("max" if args.max else f"{args.rate // 1000}k", rec, speed,
                        args.seconds + 0.5, nominal=None if args.max else args.rate,
                        hook=hook, drain_s=10.0)
        for sp in spies.values():
            sp.wait(60)
        pipe.stop()
    finally:
        for sp in spies.values():
            if sp.poll() is None:
                sp.kill()
        children.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    cpu = res.get("cpu_us_per_msg", {})
    print(f"\n{args.scenario} at {'max' if args.max else args.rate}: delivered "
          f"{res.get('delivered_msgs_per_s', 0):,.0f} msgs/s, lost {res.get('lost')}, "
          f"p50 {res.get('latency', {}).get('p50_us', 0):,.0f} us")
    for role in ("replay", "ingest", "bookd", "bus", "subscriber"):
        f = args.out / f"{role}.txt"
        if not f.exists():
            continue
        self_t, incl, total, idle = parse(f)
        busy = max(1, total - idle)
        print(f"\n== {role}: {cpu.get(role, 0):.1f} us CPU per message; {total} samples, "
              f"{idle / max(1, total):.0%} idle")
        print("   self time (share of busy samples):")
        for name, k in self_t.most_common(args.top):
            print(f"     {k / busy:6.1%}  {name[:110]}")
        by_file: Counter = Counter()
        for name, k in self_t.items():
            src = name[name.rfind("(") + 1:].split(":")[0] if "(" in name else name
            by_file[src] += k
        print("   self time by source file:")
        for name, k in by_file.most_common(8):
            print(f"     {k / busy:6.1%}  {name}")
        print("   inclusive:")
        for name, k in incl.most_common(args.top):
            print(f"     {k / busy:6.1%}  {name[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
