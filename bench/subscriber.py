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

Cost: the subscriber shares the 2 cores with the pipeline it measures, so its loop is
lean. It blocks in `recv()` (RCVTIMEO) instead of polling: a pyzmq poll plus the
`zmq.Again` that ends every non-blocking drain cost ~6-10 us per wake-up, which at 10-20 k
msg/s was more than the per-message work. The control socket is looked at between
drains, every `CONTROL_EVERY_NS` (5 ms) at most, and whenever the feed is idle.

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


CONTROL_EVERY_NS = 5_000_000  # look at the control socket at least this often
RCVTIMEO_MS = 5               # ... and whenever the feed has been idle this long

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


class Buckets:
    """Event counts per time bucket, in two int64 arrays (16 bytes a bucket: a dict of
    ints took ~100, which a soak saw as the subscriber's RSS growing)."""

    def __init__(self) -> None:
        self.keys = array("q")
        self.counts = array("q")

    def add(self, bucket: int, count: int) -> None:
        if self.keys and self.keys[-1] == bucket:
            self.counts[-1] += count
        else:
            self.keys.append(bucket)
            self.counts.append(count)

    def items(self, cur_bucket: int = 0, cur_count: int = 0) -> list[tuple[int, int]]:
        """(bucket, count) sorted by bucket, summed per bucket (the clock may step back),
        with the bucket still being counted."""
        out: dict[int, int] = {}
        for k, n in zip(self.keys, self.counts, strict=True):
            out[k] = out.get(k, 0) + n
        if cur_count:
            out[cur_bucket] = out.get(cur_bucket, 0) + cur_count
        return sorted(out.items())


class Tally:
    """Everything the subscriber counts; `drain` is the per-message hot loop."""

    def __init__(self, check_every: int) -> None:
        self.check_every = max(1, check_every)
        self.total = self.snapshots = self.checked = self.mismatches = 0
        self.seq_gaps = 0      # missing messages implied by seq jumps
        self.seq_jumps = 0     # how many jumps
        self.bad = 0
        self.per_conn: dict[int, list] = {}   # conn_id -> [count, first_sub_ns, last_sub_ns]
        self.cur_conn = -1
        self.pc: list = []
        self.cur_bucket = self.cur_count = 0
        self.last_seq: dict[bytes, tuple[int, int]] = {}   # topic -> (epoch, seq)
        self.stats: dict[str, dict] = {}
        self.buckets = Buckets()              # events per 100 ms (unix ns // 1e8)
        self.window = False
        self.win_conn: int | None = None     # count only this ingest connection's events
        self.lat = array("q")
        self.win_count = 0
        self.win_first = self.win_last = 0

    def drain(self, recv, clock, budget_ns: int) -> None:
        """Receive and count messages for up to `budget_ns`, or until `recv` raises
        zmq.Again (its timeout: the feed is idle). State lives in locals meanwhile."""
        total, snapshots, checked = self.total, self.snapshots, self.checked
        mismatches, seq_gaps, seq_jumps, bad = (self.mismatches, self.seq_gaps,
                                                self.seq_jumps, self.bad)
        per_conn, cur_conn, pc = self.per_conn, self.cur_conn, self.pc
        cur_bucket, cur_count, buckets = self.cur_bucket, self.cur_count, self.buckets
        last_seq = self.last_seq
        window, win_conn, lat = self.window, self.win_conn, self.lat
        win_count, win_first, win_last = self.win_count, self.win_first, self.win_last
        check_every = self.check_every
        light, full_dec, crc, decode_error = _light, _full, kraken_crc, msgspec.DecodeError
        until = clock() + budget_ns
        now = 0
        try:
            while now < until:
                msg = recv()
                now = clock()
                sp = msg.find(b" ")
                topic = msg[:sp]
                if topic[:5] != b"book.":
                    bad += not self.other(topic, msg, sp, now)  # `bad` is local here
                    continue
                body = memoryview(msg)[sp + 1:]
                try:
                    env = light(body)
                except decode_error:
                    bad += 1
                    continue
                total += 1
                ev = env.event
                seq = env.seq
                prev = last_seq.get(topic)
                if prev is not None and prev[0] == env.epoch and seq != prev[1] + 1:
                    seq_jumps += 1
                    if seq > prev[1] + 1:
                        seq_gaps += seq - prev[1] - 1
                last_seq[topic] = (env.epoch, seq)
                conn = ev.conn_id
                if conn != cur_conn:      # one connection at a time, mostly
                    cur_conn = conn
                    pc = per_conn.get(conn)
                    if pc is None:
                        pc = per_conn[conn] = [0, now, now]
                pc[0] += 1
                pc[2] = now
                if now // 100_000_000 != cur_bucket:
                    if cur_count:
                        buckets.add(cur_bucket, cur_count)
                    cur_bucket, cur_count = now // 100_000_000, 0
                cur_count += 1
                if window and (win_conn is None or conn == win_conn):
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
                        full = full_dec(body).event
                    except decode_error:
                        bad += 1
                        continue
                    if crc(full.asks, full.bids) != full.checksum:
                        mismatches += 1
        except zmq.Again:
            pass
        finally:
            self.total, self.snapshots, self.checked = total, snapshots, checked
            self.mismatches, self.seq_gaps, self.seq_jumps, self.bad = (
                mismatches, seq_gaps, seq_jumps, bad)
            self.cur_conn, self.pc = cur_conn, pc
            self.cur_bucket, self.cur_count = cur_bucket, cur_count
            self.win_count, self.win_first, self.win_last = win_count, win_first, win_last

    def other(self, topic: bytes, msg: bytes, sp: int, now: int) -> bool:
        """A message that is not a book: keep `stats` events by process. False for one
        that does not decode (the caller counts it in `bad`)."""
        if topic == b"stats":
            try:
                ev = _stats(memoryview(msg)[sp + 1:]).event
            except msgspec.DecodeError:
                return False
            self.stats[ev.process] = {"pid": ev.pid, "counters": ev.counters,
                                      "gauges": ev.gauges, "at_ns": now}
        return True

    def control(self, req: dict, now: int) -> tuple[dict, bool]:
        """The reply to one control request, and whether to keep running."""
        cmd = req.get("cmd")
        reply: dict = {"ok": True}
        running = True
        if cmd == "window":
            if req.get("on"):
                self.window = True
                self.win_conn = int(req["conn"]) if req.get("conn") else None
                self.lat = array("q")
                self.win_count = 0
                self.win_first = self.win_last = 0
            else:
                self.window = False
                reply["window"] = _percentiles(self.lat)
                reply["window"].update(count=self.win_count, first_ns=self.win_first,
                                       last_ns=self.win_last)
                if req.get("raw"):
                    reply["raw_us"] = [x // 1000 for x in self.lat]
        elif cmd == "stop":
            running = False
        if cmd in ("get", "window", "stop"):
            ru = resource.getrusage(resource.RUSAGE_SELF)
            reply.update(
                now_ns=now, total=self.total, snapshots=self.snapshots,
                checked=self.checked, mismatches=self.mismatches, seq_gaps=self.seq_gaps,
                seq_jumps=self.seq_jumps, bad=self.bad,
                per_conn={str(k): v for k, v in self.per_conn.items()}, stats=self.stats,
                cpu_s=ru.ru_utime + ru.ru_stime)
            if req.get("buckets"):
                reply["buckets"] = self.buckets.items(self.cur_bucket, self.cur_count)
        return reply, running


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", required=True, action="append",
                    help="a PUB to connect to (repeat for several)")
    ap.add_argument("--control", required=True)
    ap.add_argument("--check-every", type=int, default=10)
    args = ap.parse_args(argv)

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 100_000)
    sub.setsockopt(zmq.RCVTIMEO, RCVTIMEO_MS)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"book.")
    sub.setsockopt(zmq.SUBSCRIBE, b"stats ")
    for ep in args.endpoint:
        sub.connect(ep)
    ctl = ctx.socket(zmq.PAIR)
    ctl.setsockopt(zmq.LINGER, 0)
    ctl.bind(args.control)

    tally = Tally(args.check_every)
    clock = time.time_ns
    recv = sub.recv
    running = True
    while running:
        tally.drain(recv, clock, CONTROL_EVERY_NS)
        while running and ctl.poll(0):
            try:
                req = msgspec.json.decode(ctl.recv())
            except msgspec.DecodeError:
                ctl.send(b'{"ok":false}')
                continue
            reply, running = tally.control(req, clock())
            ctl.send(msgspec.json.encode(reply))
    sub.close()
    ctl.close()
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
