"""Where end-to-end latency goes: ingest -> bus stamp -> subscriber, by position in a burst.

    .venv/bin/python bench/latency_split.py [--rate 10000] [--seconds 8]

Starts the load test's pipeline (replay, ingest, bookd, bus, the load-test subscriber;
bench/lt_pipeline.py) on the quick depth-10 recording, runs one fixed-rate step and, in
a thread of this process, a second subscriber on the bus's JSON ipc endpoint. For every
MarketDataL2Event it keeps the event's `recv_ns` (ingest's receive time), the envelope's
`pub_ns` (the bus's stamp) and its own receive time, then prints percentiles of
ingest -> bus (two ipc hops and bookd's work) and bus -> subscriber, over the events
after the first fifth (warm-up), and the same by position within a burst: the replay
server sends a timer tick's frames together (~10 per 1 ms tick at 10 k msgs/s), so
frames whose `recv_ns` follow the previous one within 100 us count as one burst.

Figures only (CONVENTIONS.md); a shared 2-core VM is noisy, so compare positions and
hops within one run. Uses its own namespace, ports and temp dirs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec
import numpy as np
import zmq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from loadtest import SCALES  # noqa: E402
from lt_pipeline import Pipeline  # noqa: E402
from lt_procs import Children, make_recordings  # noqa: E402

BURST_GAP_NS = 100_000


class _Event(msgspec.Struct):
    recv_ns: int


class _Envelope(msgspec.Struct):
    pub_ns: int
    event: _Event


_decode = msgspec.json.Decoder(_Envelope).decode


def _listen(endpoint: str, rows: list, stop: threading.Event) -> None:
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"book.")
    sock.setsockopt(zmq.RCVTIMEO, 100)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        while not stop.is_set():
            try:
                msg = sock.recv()
            except zmq.Again:
                continue
            now = time.time_ns()
            env = _decode(msg[msg.index(b" ") + 1:])
            rows.append((env.event.recv_ns, env.pub_ns, now))
    finally:
        sock.close()


def _pct(x: np.ndarray) -> str:
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return f"p50 {p50:7,.0f}  p90 {p90:7,.0f}  p99 {p99:7,.0f} us"


def report(rows: list[tuple[int, int, int]]) -> None:
    a = np.array(rows[len(rows) // 5:], dtype=np.int64)
    if len(a) < 100:
        print(f"only {len(a)} events after warm-up: nothing to report")
        return
    a = a[np.argsort(a[:, 0], kind="stable")]
    to_bus = (a[:, 1] - a[:, 0]) / 1e3
    to_sub = (a[:, 2] - a[:, 1]) / 1e3
    total = (a[:, 2] - a[:, 0]) / 1e3
    print(f"ingest -> bus stamp      {_pct(to_bus)}")
    print(f"bus -> subscriber (ipc)  {_pct(to_sub)}")
    print(f"total                    {_pct(total)}   ({len(a):,} events)")
    new_burst = np.diff(a[:, 0], prepend=a[0, 0] - 10 * BURST_GAP_NS) > BURST_GAP_NS
    pos = np.zeros(len(a), dtype=np.int64)
    for i in range(1, len(a)):
        pos[i] = 0 if new_burst[i] else pos[i - 1] + 1
    print("by position in a burst (p50 us): position, events, ingest -> bus, total")
    for k in range(int(pos.max()) + 1):
        m = pos == k
        if m.sum() >= 50:
            print(f"  {k:3d} {int(m.sum()):8,d} {np.median(to_bus[m]):9,.0f} "
                  f"{np.median(total[m]):9,.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=int, default=10_000, help="book msgs/s (default 10000)")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of the step")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="kflat"))
    children = Children(work)
    rows: list[tuple[int, int, int]] = []
    stop = threading.Event()
    try:
        spec = {"d10": SCALES["quick"]["recordings"]["d10"]}
        rec = make_recordings(spec, children)["d10"]
        pipe = Pipeline(children, "d10", rec.symbols, rec.depth)
        pipe.start()
        listener = threading.Thread(target=_listen, daemon=True, args=(
            f"ipc://{pipe.run_dir}/{pipe.ns}.bus.json", rows, stop))
        listener.start()
        res = pipe.step("split", rec, args.rate / rec.rate, args.seconds, nominal=args.rate,
                        drain_s=5.0)
        stop.set()
        listener.join(2)
        pipe.stop()
    finally:
        stop.set()
        children.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    cpu = res.get("cpu_us_per_msg", {})
    print(f"\nat {args.rate:,} msgs/s: load-test subscriber p50 "
          f"{res.get('latency', {}).get('p50_us', 0):,.0f} us; CPU us/msg " +
          ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()))
    report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
