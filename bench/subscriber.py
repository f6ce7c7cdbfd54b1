"""The load test's bus subscriber: counts L2 events, checks seq and checksums, times them.

Run by bench/loadtest.py as its own process (one core's worth of budget on a 2-core VM,
so it does as little as it can per message)::

    python bench/subscriber.py --endpoint tcp://127.0.0.1:PORT --control ipc://PATH
        [--check-every N]

It subscribes to `book.` and `stats ` on the JSON PUB (RCVHWM 100 000, like the bus's
SNDHWM) and for every book message:

* decodes only the envelope's `epoch`, `seq` and the event's `recv_ns`, `conn_id`,
  `snapshot` (msgspec skips the levels);
* counts it per ingest connection (`conn_id`: one replay connection per load step);
* checks `seq` continuity per topic within an epoch (a jump is loss, DESIGN.md section 3);
* latency = `time.time_ns()` at receive - `recv_ns` (ingest's receive time), kept while a
  window is open;
* every N-th message and every snapshot: decodes the levels and recomputes Kraken's
  CRC32 from the decimal strings (`"62807.0"` -> `"628070"`, leading zeros stripped),
  asks then bids, top 10; a difference is a mismatch.

`stats` events (StatsEvent of ingest, bookd, bus) are kept by process, so the
orchestrator sees bookd's own mismatches, gaps and resyncs and ingest's drops.

Control: a ZMQ PAIR bound at `--control`; requests and replies are JSON objects:
`{"cmd": "get"}` (counters), `{"cmd": "window", "on": true, "conn": ID}` (start
collecting latencies of that ingest connection's events, or of all without "conn"),
`{"cmd": "window", "on": false, "raw": false}` (stop; reply
has the window's percentiles, a histogram and, with raw, every latency in us),
`{"cmd": "stop"}`.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import zlib
from array import array

import msgspec
import zmq


class _LightEvent(msgspec.Struct, gc=False):
    recv_ns: int
    conn_id: int
    snapshot: bool = False


class _Light(msgspec.Struct, gc=False):
    epoch: int
    seq: int
    event: _LightEvent


class _FullEvent(msgspec.Struct, gc=False):
    bids: list[tuple[str, str]]
    asks: list[tuple[str, str]]
    checksum: int


class _Full(msgspec.Struct, gc=False):
    event: _FullEvent


class _StatsEvent(msgspec.Struct):
    process: str
    pid: int
    counters: dict[str, int]
    gauges: dict[str, float] = {}


class _Stats(msgspec.Struct):
    event: _StatsEvent


_light = msgspec.json.Decoder(_Light).decode
_full = msgspec.json.Decoder(_Full).decode
_stats = msgspec.json.Decoder(_Stats).decode


def kraken_crc(asks: list[tuple[str, str]], bids: list[tuple[str, str]]) -> int:
    """Kraken's book checksum from decimal strings spelled at the pair's precision."""
    parts = []
    for p, q in asks[:10]:
        parts.append(p.replace(".", "").lstrip("0"))
        parts.append(q.replace(".", "").lstrip("0"))
    for p, q in bids[:10]:
        parts.append(p.replace(".", "").lstrip("0"))
        parts.append(q.replace(".", "").lstrip("0"))
    return zlib.crc32("".join(parts).encode())


def _percentiles(lat: array) -> dict:
    if not lat:
        return {"n": 0}
    import numpy as np
    a = np.frombuffer(lat, dtype=np.int64).astype(np.float64) / 1000.0  # us
    p50, p90, p99, p999 = np.percentile(a, [50, 90, 99, 99.9])
    hist, edges = np.histogram(np.log10(np.clip(a, 1, None)), bins=60, range=(0, 6))
    return {"n": int(a.size), "p50_us": float(p50), "p90_us": float(p90),
            "p99_us": float(p99), "p999_us": float(p999), "max_us": float(a.max()),
            "mean_us": float(a.mean()),
            "hist_log10_us": {"counts": hist.tolist(), "edges": edges.tolist()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--control", required=True)
    ap.add_argument("--check-every", type=int, default=10)
    args = ap.parse_args(argv)

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 100_000)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"book.")
    sub.setsockopt(zmq.SUBSCRIBE, b"stats ")
    sub.connect(args.endpoint)
    ctl = ctx.socket(zmq.PAIR)
    ctl.setsockopt(zmq.LINGER, 0)
    ctl.bind(args.control)
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    poller.register(ctl, zmq.POLLIN)

    check_every = max(1, args.check_every)
    total = 0
    snapshots = 0
    checked = 0
    mismatches = 0
    seq_gaps = 0          # missing messages implied by seq jumps
    seq_jumps = 0         # how many jumps
    bad = 0
    per_conn: dict[int, list] = {}   # conn_id -> [count, first_sub_ns, last_sub_ns]
    cur_conn = -1
    pc: list = []
    cur_bucket = cur_count = 0
    last_seq: dict[bytes, tuple[int, int]] = {}   # topic -> (epoch, seq)
    stats: dict[str, dict] = {}
    buckets: dict[int, int] = {}     # 100 ms bucket (unix ns // 1e8) -> events
    window = False
    win_conn: int | None = None     # count only this ingest connection's events
    lat = array("q")
    win_count = 0
    win_first = win_last = 0
    recv = sub.recv
    clock = time.time_ns
    again = zmq.Again
    NOBLOCK = zmq.NOBLOCK
    running = True
    while running:
        events = dict(poller.poll(100))
        if sub in events:
            for _ in range(2000):
                try:
                    msg = recv(NOBLOCK)
                except again:
                    break
                now = clock()
                sp = msg.find(b" ")
                topic = msg[:sp]
                if topic[:5] != b"book.":
                    if topic == b"stats":
                        try:
                            ev = _stats(msg[sp + 1:]).event
                            stats[ev.process] = {"pid": ev.pid, "counters": ev.counters,
                                                 "gauges": ev.gauges, "at_ns": now}
                        except msgspec.DecodeError:
                            bad += 1
                    continue
                body = memoryview(msg)[sp + 1:]
                try:
                    env = _light(body)
                except msgspec.DecodeError:
                    bad += 1
                    continue
                total += 1
                ev = env.event
                prev = last_seq.get(topic)
                if prev is not None and prev[0] == env.epoch and env.seq != prev[1] + 1:
                    seq_jumps += 1
                    if env.seq > prev[1] + 1:
                        seq_gaps += env.seq - prev[1] - 1
                last_seq[topic] = (env.epoch, env.seq)
                if ev.conn_id != cur_conn:      # one connection at a time, mostly
                    cur_conn = ev.conn_id
                    pc = per_conn.get(cur_conn)
                    if pc is None:
                        pc = per_conn[cur_conn] = [0, now, now]
                pc[0] += 1
                pc[2] = now
                b = now // 100_000_000
                if b != cur_bucket:
                    if cur_count:
                        buckets[cur_bucket] = buckets.get(cur_bucket, 0) + cur_count
                    cur_bucket, cur_count = b, 0
                cur_count += 1
                if window and (win_conn is None or ev.conn_id == win_conn):
                    lat.append(now - ev.recv_ns)
                    win_count += 1
                    if not win_first:
                        win_first = now
                    win_last = now
                if ev.snapshot or total % check_every == 0:
                    if ev.snapshot:
                        snapshots += 1
                    checked += 1
                    try:
                        full = _full(body).event
                    except msgspec.DecodeError:
                        bad += 1
                        continue
                    if kraken_crc(full.asks, full.bids) != full.checksum:
                        mismatches += 1
        if ctl in events:
            try:
                req = msgspec.json.decode(ctl.recv())
            except msgspec.DecodeError:
                ctl.send(b'{"ok":false}')
                continue
            cmd = req.get("cmd")
            reply: dict = {"ok": True}
            if cmd == "window":
                if req.get("on"):
                    window = True
                    win_conn = int(req["conn"]) if req.get("conn") else None
                    lat = array("q")
                    win_count = 0
                    win_first = win_last = 0
                else:
                    window = False
                    reply["window"] = _percentiles(lat)
                    reply["window"].update(count=win_count, first_ns=win_first,
                                           last_ns=win_last)
                    if req.get("raw"):
                        reply["raw_us"] = [x // 1000 for x in lat]
            elif cmd == "stop":
                running = False
            if cmd in ("get", "window", "stop"):
                ru = resource.getrusage(resource.RUSAGE_SELF)
                reply.update(
                    now_ns=clock(), total=total, snapshots=snapshots, checked=checked,
                    mismatches=mismatches, seq_gaps=seq_gaps, seq_jumps=seq_jumps, bad=bad,
                    per_conn={str(k): v for k, v in per_conn.items()}, stats=stats,
                    cpu_s=ru.ru_utime + ru.ru_stime)
                if req.get("buckets"):
                    all_b = dict(buckets)
                    if cur_count:
                        all_b[cur_bucket] = all_b.get(cur_bucket, 0) + cur_count
                    reply["buckets"] = sorted(all_b.items())
            ctl.send(msgspec.json.encode(reply))
    sub.close()
    ctl.close()
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
