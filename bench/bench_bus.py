"""Bus throughput: L2 events in, envelopes out to 1 and to 10 subscribers.

    .venv/bin/python bench/bench_bus.py [--messages 100000] [--subscribers 1 10]
                                        [--depth 10] [--pairs 4] [--sndhwm 100000]
                                        [--batch 10] [--json]

For each subscriber count: starts `python -m bus` in a subprocess (its own namespace,
temp run dir and free ports), starts the subscribers as separate processes (SUB on the
JSON PUB over loopback TCP, subscribed to `book.`; each decodes topic, epoch, seq and
pub_ns of every envelope, counts messages and `seq` gaps per topic), waits until every
subscription is in effect, then a producer PUSHes `--messages` realistic L2 events
(depth `--depth` JSON, as bookd sends them: `--batch` events per BATCH message, 1 for
lone events) to `bus.in` as fast as the bus takes them.

Reported per run:
* producer msgs/s: how fast the bus accepted events (its PULL queue paces the producer);
* bus publish msgs/s: first to last `pub_ns` seen by a subscriber (the bus's own clock);
* delivered msgs/s per subscriber (its first to last receive) and in total (all
  messages delivered / wall time from the first push to the last receive);
* loss: events a subscriber never got (`seq` gaps, plus any missing at the end);
* bus-to-subscriber latency p50/p99 (receive time minus `pub_ns`: queueing included);
* the bus process's CPU (all threads) per event, first push to the last receive.

Figures only, no pass/fail (CONVENTIONS.md); the machines are shared and noisy.
`--json` prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))
from lt_procs import cpu_s, free_ports  # noqa: E402

from bus.schema import MarketDataL2Event, ns_to_rfc3339  # noqa: E402
from ingest.config import load_config  # noqa: E402
from ingest.messages import pack_batch, pack_event  # noqa: E402

PAIRS = ("BTC/USD", "ETH/USD", "SOL/USD", "XRP/USD", "ADA/USD", "DOT/USD", "LTC/USD",
         "AVAX/USD")
IDLE_S = 3.0  # a subscriber that got nothing for this long after the burst is done


class _Head(msgspec.Struct):
    """The envelope fields a subscriber needs; msgspec skips the rest of the event."""

    topic: str
    epoch: int
    seq: int
    pub_ns: int


def _write_config(directory: Path, sndhwm: int) -> Path:
    namespace = "kfbench" + secrets.token_hex(3)
    run_dir = tempfile.mkdtemp(prefix="kf")
    jp, mp_, cp = free_ports(3)
    path = directory / f"{namespace}.toml"
    path.write_text(
        f'[system]\nnamespace = "{namespace}"\nrun_dir = "{run_dir}"\nlog_level = "WARNING"\n'
        f'[trading]\npairs = ["BTC/USD"]\n'
        f"[bus]\njson_port = {jp}\nmsgpack_port = {mp_}\ncache_port = {cp}\n"
        f"sndhwm = {sndhwm}\nstats_interval_s = 60.0\n", encoding="utf-8")
    return path


def _book(pair: str, i: int, depth: int) -> MarketDataL2Event:
    base = 60_000 + (i % 500)
    return MarketDataL2Event(
        pair=pair, timestamp=ns_to_rfc3339(1_786_923_423_000_000_000 + i * 1000),
        bids=[(f"{base - k}.{(i + k) % 10}", f"{0.0137 * (k + 1) + i % 7:.8f}")
              for k in range(depth)],
        asks=[(f"{base + 1 + k}.{(i + k) % 10}", f"{0.0211 * (k + 1) + i % 5:.8f}")
              for k in range(depth)],
        checksum=(i * 2654435761) % 2**32, conn_id=1,
        exchange_ts_ns=1_786_923_423_000_000_000 + i * 1000,
        recv_ns=1_786_923_423_000_100_000 + i * 1000, snapshot=False, depth=depth,
        price_precision=1, qty_precision=8)


def _events(n_variants: int, pairs: int, depth: int) -> list[bytes]:
    enc = msgspec.json.Encoder()
    out = []
    for i in range(n_variants):
        pair = PAIRS[i % pairs]
        out.append(pack_event(f"book.{pair}", "MarketDataL2Event",
                              enc.encode(_book(pair, i, depth))))
    return out


def subscriber_main(endpoint: str, idx: int, ready: mp.Queue, results: mp.Queue) -> None:
    """One subscriber process: count envelopes, seq gaps and latency until idle."""
    dec = msgspec.json.Decoder(_Head)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"book.")
    sub.setsockopt(zmq.SUBSCRIBE, b"system ")
    sub.connect(endpoint)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    count = gaps = lost = 0
    lat: list[int] = []
    first_ns = last_ns = 0
    is_ready = False
    now = time.time_ns
    try:
        while True:
            if not sub.poll(int(IDLE_S * 1000) if count else 60_000):
                break
            msg = sub.recv()
            t = now()
            if msg.startswith(b"system "):
                if not is_ready and b"bench warm-up" in msg:
                    is_ready = True
                    ready.put(idx)
                continue
            head = dec.decode(memoryview(msg)[msg.index(b" ") + 1:])
            prev = last.get(head.topic)
            if prev is None:
                first[head.topic] = head.seq
            elif head.seq != prev + 1:
                gaps += 1
                lost += head.seq - prev - 1
            last[head.topic] = head.seq
            if not count:
                first_ns = t
                first_pub = head.pub_ns
            count += 1
            last_ns = t
            last_pub = head.pub_ns
            lat.append(t - head.pub_ns)
    finally:
        sub.close()
        ctx.term()
    lat.sort()
    results.put({
        "idx": idx, "count": count, "gaps": gaps, "lost_in_gaps": lost,
        "first_ns": first_ns, "last_ns": last_ns,
        "pub_span_ns": (last_pub - first_pub) if count else 0,
        "first_seq": first, "last_seq": last, "lat_p50_ms": lat[len(lat) // 2] / 1e6 if lat else None,
        "lat_p99_ms": lat[int(len(lat) * 0.99)] / 1e6 if lat else None,
    })


def run_once(n_subs: int, messages: int, depth: int, pairs: int, sndhwm: int,
             workdir: Path, batch: int = 1) -> dict:
    cfg_path = _write_config(workdir, sndhwm)
    cfg = load_config(cfg_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("KRAKENFEED_CONFIG", None)
    bus = subprocess.Popen([sys.executable, "-m", "bus", "--config", str(cfg_path)],
                           cwd=ROOT, env=env, stdin=subprocess.DEVNULL)
    spawn = mp.get_context("spawn")
    ready, results = spawn.Queue(), spawn.Queue()
    endpoint = f"tcp://127.0.0.1:{cfg.port('bus', 'json_port')}"
    subs = [spawn.Process(target=subscriber_main, args=(endpoint, i, ready, results),
                          daemon=True) for i in range(n_subs)]
    for p in subs:
        p.start()
    events = _events(min(messages, 4000), pairs, depth)
    expected: dict[str, int] = {}  # messages per topic; the bus numbers each from 1
    for i in range(messages):
        topic = f"book.{PAIRS[i % len(events) % pairs]}"
        expected[topic] = expected.get(topic, 0) + 1
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    push.connect(cfg.ipc("bus.in"))
    warm = msgspec.json.encode({
        "timestamp": ns_to_rfc3339(time.time_ns()), "service_name": "bench",
        "status_code": "CONNECTED", "status_message": "bench warm-up"})
    try:
        got_ready: set[int] = set()
        deadline = time.monotonic() + 60
        while len(got_ready) < n_subs:
            if time.monotonic() > deadline or bus.poll() is not None:
                raise RuntimeError("subscribers did not get ready (is the bus running?)")
            push.send(pack_event("system", "SystemStateEvent", warm))
            try:
                while True:
                    got_ready.add(ready.get(timeout=0.02))
            except Exception:  # queue.Empty
                pass
        cpu0 = cpu_s(bus.pid) or 0.0
        t0 = time.perf_counter()
        t0_ns = time.time_ns()
        n_ev = len(events)
        send = push.send
        if batch <= 1:
            for i in range(messages):
                send(events[i % n_ev])
        else:
            for i in range(0, messages, batch):
                send(pack_batch([events[k % n_ev] for k in range(i, min(i + batch, messages))]))
        push_s = time.perf_counter() - t0
        outs = [results.get(timeout=120 + messages / 5000) for _ in subs]
        bus_cpu = (cpu_s(bus.pid) or 0.0) - cpu0  # includes the subscribers' idle wait
    finally:
        for p in subs:
            p.join(5)
            if p.is_alive():
                p.kill()
        push.close()
        ctx.term()
        bus.terminate()
        try:
            bus.wait(10)
        except subprocess.TimeoutExpired:
            bus.kill()
            bus.wait()
        shutil.rmtree(cfg.run_path, ignore_errors=True)

    outs.sort(key=lambda r: r["idx"])
    rates = []
    for r in outs:
        span = (r["last_ns"] - r["first_ns"]) / 1e9
        r["rate"] = r["count"] / span if span > 0 else 0.0
        # Whatever never arrived: before the first, in seq gaps, after the last.
        r["lost"] = messages - r["count"]
        r["lost_at_start"] = sum(r["first_seq"].get(t, n + 1) - 1 for t, n in expected.items())
        r["lost_at_end"] = sum(n - r["last_seq"].get(t, n) for t, n in expected.items())
        rates.append(r["rate"])
    wall = (max(r["last_ns"] for r in outs) - t0_ns) / 1e9
    pub_span = max(r["pub_span_ns"] for r in outs) / 1e9
    size = len(events[0]) - 32  # minus the internal header: the event JSON plus names
    return {
        "subscribers": n_subs, "messages": messages, "depth": depth, "pairs": pairs,
        "batch": batch,
        "sndhwm": sndhwm, "event_bytes": size,
        "producer_msgs_per_s": messages / push_s if push_s else 0.0,
        "bus_publish_msgs_per_s": messages / pub_span if pub_span else 0.0,
        "per_subscriber_msgs_per_s": {"min": min(rates), "median": statistics.median(rates),
                                      "max": max(rates)},
        "total_delivered_msgs_per_s": sum(r["count"] for r in outs) / wall,
        "delivered": sum(r["count"] for r in outs),
        "lost_total": sum(r["lost"] for r in outs),
        "seq_gaps_total": sum(r["gaps"] for r in outs),
        "lost_in_gaps_total": sum(r["lost_in_gaps"] for r in outs),
        "lost_at_start_total": sum(r["lost_at_start"] for r in outs),
        "lost_at_end_total": sum(r["lost_at_end"] for r in outs),
        "bus_cpu_us_per_msg": bus_cpu * 1e6 / messages,
        "latency_p50_ms_median": statistics.median(r["lat_p50_ms"] or 0 for r in outs),
        "latency_p99_ms_max": max(r["lat_p99_ms"] or 0 for r in outs),
    }


def table(runs: list[dict]) -> str:
    head = (f"{'subs':>4}  {'producer/s':>10}  {'bus pub/s':>10}  "
            f"{'per-sub delivered/s min/med/max':>32}  {'total/s':>10}  {'lost':>8}  "
            f"{'start/gaps/end':>14}  {'lat p50/p99 ms':>15}  {'bus us/msg':>10}")
    lines = [head, "-" * len(head)]
    for r in runs:
        ps = r["per_subscriber_msgs_per_s"]
        where = (f"{r['lost_at_start_total']}/{r['lost_in_gaps_total']}"
                 f"/{r['lost_at_end_total']}")
        lines.append(
            f"{r['subscribers']:>4}  {r['producer_msgs_per_s']:>10,.0f}  "
            f"{r['bus_publish_msgs_per_s']:>10,.0f}  "
            f"{ps['min']:>10,.0f} /{ps['median']:>9,.0f} /{ps['max']:>9,.0f}  "
            f"{r['total_delivered_msgs_per_s']:>10,.0f}  {r['lost_total']:>8,}  "
            f"{where:>14}  "
            f"{r['latency_p50_ms_median']:>6.1f} / {r['latency_p99_ms_max']:>6.1f}  "
            f"{r['bus_cpu_us_per_msg']:>10.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--subscribers", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--depth", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=4, choices=range(1, len(PAIRS) + 1))
    ap.add_argument("--sndhwm", type=int, default=100_000,
                    help="[bus] sndhwm, each subscriber's queue in the bus (default 100000)")
    ap.add_argument("--batch", type=int, default=10,
                    help="events per producer message, as bookd batches them (default 10)")
    ap.add_argument("--json", action="store_true", help="print a JSON object last")
    args = ap.parse_args(argv)
    machine = {"python": platform.python_version(), "cpus": os.cpu_count(),
               "platform": platform.platform(), "libzmq": zmq.zmq_version(),
               "pyzmq": zmq.__version__}
    with tempfile.TemporaryDirectory(prefix="kfbench") as tmp:
        runs = [run_once(n, args.messages, args.depth, args.pairs, args.sndhwm, Path(tmp),
                         args.batch) for n in args.subscribers]
    r0 = runs[0]
    print(f"bus throughput: {args.messages:,} L2 events (depth {args.depth}, "
          f"~{r0['event_bytes']} B JSON each) in batches of {args.batch} over "
          f"{args.pairs} pairs, sndhwm "
          f"{args.sndhwm:,}; {machine['cpus']} CPUs, Python {machine['python']}, "
          f"libzmq {machine['libzmq']}")
    print(table(runs))
    print("delivered/s: a subscriber's messages over its first-to-last receive; total: "
          "all delivered over first push to last receive; lost: never received, "
          "before a subscriber's first message / in seq gaps / after its last.")
    if args.json:
        print(json.dumps({"machine": machine, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
