"""bookd's cost per update in the pipeline: in-process split, the real process, readers.

A synthetic depth-10 recording of a few pairs is generated in-process
(`replay.synthetic.SyntheticMarket`, fixed seed) and pre-packed exactly as ingest sends
it: a `PairInfo` control message per pair, then every book frame with its header
(`ingest.messages.pack_frame`, contiguous per-pair sequence numbers).

(a) In-process, `BookKeeper.on_frame` over the stream (header fields pre-unpacked, as the
    service hands them over), four configurations, each from a fresh keeper:

      A  null writer, null out, JSON rendering stubbed  -> decode + apply + checksum
                                                           (+ the keeper's own logic)
      B  A + rendering the L2 event JSON                -> render = B - A
      C  B + a real shm BookWriter                      -> publish = C - B
      D  C + a real PUSH socket (bookd's own `_Out`)    -> send = D - C; total = D
         to a PULL drained by zmq.proxy in a thread (C code, no GIL): a null sink

    The header unpack + slice the service does per message is timed on its own. Times
    are the timing thread's CPU time (CLOCK_THREAD_CPUTIME_ID), so time spent
    descheduled on a busy shared box does not count; libzmq's I/O thread (which does
    the socket writes of D in parallel) is not included.
(b) As a process: `python -m bookd` with its own namespace; every frame is PUSHed at
    its `bookd` socket, and the MarketDataL2Events are counted at a PULL bound at
    `bus.in`: msgs/s from the first send to the last event (the sender blocks on the
    queue's high-water mark). Twice: one ZMQ message per frame (bookd's high-water
    mark is sized for batches, so this run also measures the two processes waking
    each other up), and in BATCHes of 100 frames, as ingest forwards a busy socket
    (bookd is the bottleneck: what the pipeline gets).
(c) `BookReader.snapshot()` calls per second in another process, while bookd is idle
    and while it is being fed (the stream again, on new connection ids).

Figures only, no assertions (CONVENTIONS.md). For (a) the configurations run
interleaved, --reps times each; the split uses each one's best run (the least disturbed
by other load), medians are shown beside it. Compare ratios within one run (PERFORMANCE.md "Noise"). Uses its own namespace and temp dir and
removes them.

    .venv/bin/python bench/bench_bookd.py [--frames 10000] [--process-frames 60000] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from time import thread_time_ns

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402

from bookd.book import Book  # noqa: E402
from bookd.keeper import BookKeeper  # noqa: E402
from bookd.reader import BookReader  # noqa: E402
from bookd.service import _Out  # noqa: E402
from bookd.shm import BookWriter, unlink_namespace  # noqa: E402
from ingest.messages import (  # noqa: E402
    HEADER_SIZE,
    PairInfo,
    inner_messages,
    pack_batch,
    pack_control,
    pack_frame,
    unpack_header,
    unpack_inner,
)
from ingest.wire import decode_book  # noqa: E402
from replay.synthetic import SyntheticMarket  # noqa: E402

PAIRS = ["BTC/USD", "ETH/USD", "SOL/USD", "XRP/USD"]
DEPTH = 10
RECV0 = 1_767_225_600 * 10**9
BATCH = 100  # frames per BATCH message in the batched (b) runs (ingest: up to 128)


# --------------------------------------------------------------------------- the stream

class Stream:
    """Frames of the synthetic market and their ingest packing for one connection."""

    def __init__(self, n: int, seed: int) -> None:
        m = SyntheticMarket(PAIRS, DEPTH, seed, trade_ratio=0.0)
        self.precisions = m.precisions
        frames = [(s, m.snapshot_frame(s)) for s in PAIRS]
        while len(frames) < n + len(PAIRS):
            f = m.next_event()
            if f.channel == "book":
                frames.append((f.symbol, f.frame))
        self.frames = frames
        self.levels = sum(f.count(b'"price"') for _, f in frames[len(PAIRS):]) / n
        self.bytes = sum(len(f) for _, f in frames[len(PAIRS):]) / n

    def infos(self, conn_id: int) -> list[PairInfo]:
        return [PairInfo(conn_id, p, i, DEPTH, *self.precisions[p]) for i, p in enumerate(PAIRS)]

    def packed(self, conn_id: int) -> list[bytes]:
        """What ingest sends bookd for this stream on connection `conn_id`."""
        index = {p: i for i, p in enumerate(PAIRS)}
        out = [pack_control(info, conn_id, info.pair_index) for info in self.infos(conn_id)]
        seq = dict.fromkeys(PAIRS, 0)
        for k, (sym, frame) in enumerate(self.frames):
            seq[sym] += 1
            out.append(pack_frame(frame, conn_id, index[sym], seq[sym], RECV0 + k * 1000))
        return out


# --------------------------------------------------------------------------- (a) in-process

class NullWriter:
    def publish(self, i, bid_prices, bid_qtys, ask_prices, ask_qtys, *, checksum,
                exchange_ts_ns, recv_ns):
        pass

    def publish_book(self, i, book, changed, checksum, exchange_ts_ns, recv_ns):
        pass

    def set_state(self, i, state):
        pass

    def set_precision(self, i, price_precision, qty_precision):
        pass

    def count(self, i, mismatches=0, resyncs=0):
        pass


class NullOut:
    def event(self, topic, type_name, payload):
        pass

    def resync(self, req):
        pass


_STUB = b'{"pair":"X"}'


def _stub_render(*_args) -> bytes:
    return _STUB


def run_keeper(stream: Stream, msgs: list[tuple], writer, out, render: bool) -> tuple[float, dict]:
    """us per on_frame over the stream, from a fresh keeper; and its counters."""
    keeper = BookKeeper(PAIRS, DEPTH, writer, out, clock_ns=time.time_ns)
    if not render:
        keeper._l2_json = _stub_render  # instance attribute shadows the method
    for info in stream.infos(1):
        keeper.on_control(info, 0)
    on_frame = keeper.on_frame
    gc.collect()
    t0 = thread_time_ns()
    for pair_index, conn_id, seq, recv_ns, frame in msgs:
        on_frame(pair_index, conn_id, seq, recv_ns, frame, 1)
    t1 = thread_time_ns()
    return (t1 - t0) / 1e3 / len(msgs), keeper.counters


def run_core(stream: Stream, msgs: list[tuple]) -> float:
    """us per message of decode_book + Book.apply + checksum compare alone (no keeper)."""
    books = [Book(p, DEPTH) for p in PAIRS]
    precisions = stream.precisions
    for i, (_, frame) in enumerate(stream.frames[:len(PAIRS)]):
        (u,) = decode_book(frame, precisions)
        books[i].apply(True, u.bids, u.asks)
    bad = 0
    gc.collect()
    t0 = thread_time_ns()
    for pair_index, _, _, _, frame in msgs:
        for u in decode_book(frame, precisions):
            if books[pair_index].apply(u.snapshot, u.bids, u.asks) != u.checksum:
                bad += 1
    t1 = thread_time_ns()
    return (t1 - t0) / 1e3 / len(msgs) if not bad else float("nan")


def bench_inprocess(stream: Stream, reps: int, tmp: str) -> dict:
    packed = stream.packed(1)[len(PAIRS):]
    msgs = []
    for m in packed:
        _, pair_index, conn_id, seq, recv_ns = unpack_header(m)
        msgs.append((pair_index, conn_id, seq, recv_ns, m[HEADER_SIZE:]))
    n = len(msgs)
    batches = [pack_batch(packed[k:k + BATCH]) for k in range(0, n, BATCH)]
    t0 = thread_time_ns()
    for b in batches:  # what the service loop does per received message
        for _rec in unpack_inner(b):
            pass
    header_us = (thread_time_ns() - t0) / 1e3 / n

    ns = "bkb" + secrets.token_hex(4)
    writer = BookWriter(ns, PAIRS, DEPTH, heartbeat_ms=100)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"ipc://{tmp}/{ns}.bus.in")
    sink = ctx.socket(zmq.PUB)  # no subscriber: every message is dropped
    sink.bind("inproc://sink")
    ctl_in = ctx.socket(zmq.PAIR)
    ctl_in.bind("inproc://ctl")
    ctl_out = ctx.socket(zmq.PAIR)
    ctl_out.connect("inproc://ctl")
    drain = threading.Thread(target=zmq.proxy_steerable, args=(pull, sink, None, ctl_in),
                             daemon=True)
    drain.start()
    to_bus = ctx.socket(zmq.PUSH)
    to_bus.setsockopt(zmq.SNDHWM, 100_000)
    to_bus.setsockopt(zmq.LINGER, 0)
    to_bus.connect(f"ipc://{tmp}/{ns}.bus.in")
    to_ingest = ctx.socket(zmq.PUSH)  # nobody binds it: nothing is sent on a clean stream
    to_ingest.setsockopt(zmq.LINGER, 0)
    to_ingest.connect(f"ipc://{tmp}/{ns}.ingest.ctl")
    real_out = _Out(to_bus, to_ingest)
    configs = {
        "A": (NullWriter(), NullOut(), False),
        "B": (NullWriter(), NullOut(), True),
        "C": (writer, NullOut(), True),
        "D": (writer, real_out, True),
    }
    times: dict[str, list[float]] = {k: [] for k in configs}
    core: list[float] = []
    checked = {}
    try:
        for _ in range(reps):
            core.append(run_core(stream, msgs[len(PAIRS):]))
            for name, (w, o, render) in configs.items():
                us, counters = run_keeper(stream, msgs, w, o, render)
                times[name].append(us)
                checked[name] = (counters["events"], counters["mismatches"])
    finally:
        ctl_out.send(b"TERMINATE")
        drain.join(5)
        for s in (pull, sink, ctl_in, ctl_out, to_bus, to_ingest):
            s.close(0)
        ctx.term()
        writer.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}

    def split(t: dict[str, float]) -> dict[str, float]:
        return {
            "decode_apply_checksum_us": t["A"],
            "render_us": t["B"] - t["A"],
            "publish_shm_us": t["C"] - t["B"],
            "send_us": t["D"] - t["C"],
            "render_send_us": t["D"] - t["C"] + t["B"] - t["A"],
            "total_us": t["D"],
        }

    return {
        "updates": n,
        "levels_per_update": stream.levels,
        "bytes_per_update": stream.bytes,
        "header_unpack_us": header_us,
        "core_best_us": min(core),
        "core_median_us": statistics.median(core),
        "best": split(best),
        "median": split(med),
        "configs_us": times,
        "events_and_mismatches": checked,
        "drops_bus": real_out.drops_bus,
    }


# --------------------------------------------------------------------------- (b) the process

def _reader_loop(namespace: str, pair: str, seconds: float, ready, out) -> None:
    """Child process: snapshot() in a loop for `seconds`; report (count, valid, retries)."""
    r = BookReader.attach(pair, timeout=20, namespace=namespace)
    r.snapshot()
    ready.set()
    n = valid = 0
    end = time.perf_counter() + seconds
    snapshot = r.snapshot
    while time.perf_counter() < end:
        for _ in range(200):
            if snapshot().state.value == 1:
                valid += 1
        n += 200
    out.put((n / seconds, valid / n, r.retries))
    r.close()


class EventCounter(threading.Thread):
    """Counts MarketDataL2Events arriving at bus.in (and remembers when the last came)."""

    def __init__(self, sock: zmq.Socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.n = 0
        self.last = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        sock = self.sock
        while not self.stop.is_set():
            if not sock.poll(50):
                continue
            while True:
                try:
                    msg = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                # bookd batches its events (ingest.messages.BATCH): count inner messages.
                inner = inner_messages(msg)
                n = sum(1 for m in inner if m[HEADER_SIZE:HEADER_SIZE + 5] == b"book.")
                if n:
                    self.n += n
                    self.last = time.perf_counter()

    def wait(self, count: int, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while self.n < count and time.monotonic() < end:
            time.sleep(0.005)
        return self.n >= count


def bench_process(stream: Stream, reader_s: float, tmp: str) -> dict:
    ns = "bkb" + secrets.token_hex(4)
    run_dir = Path(tmp) / "run"
    run_dir.mkdir()
    cfg = Path(tmp) / f"{ns}.toml"
    cfg.write_text(
        f'[system]\nnamespace = "{ns}"\nrun_dir = "{run_dir}"\nlog_level = "INFO"\n'
        f"[trading]\npairs = {json.dumps(PAIRS)}\n[data_ingestor]\nbook_depth = {DEPTH}\n",
        encoding="utf-8")
    ipc = f"ipc://{run_dir}/{ns}."
    ctx = zmq.Context()
    bus_in = ctx.socket(zmq.PULL)
    bus_in.setsockopt(zmq.RCVHWM, 0)
    bus_in.bind(ipc + "bus.in")
    ingest_ctl = ctx.socket(zmq.PULL)  # bookd's ResyncRequests land here, unread
    ingest_ctl.bind(ipc + "ingest.ctl")
    log_path = Path(tmp) / "bookd.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("KRAKENFEED_CONFIG", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bookd", "--config", str(cfg)],
                                cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=log)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    counter = EventCounter(bus_in)
    counter.start()
    spawn = mp.get_context("spawn")
    result: dict = {}
    try:
        end = time.monotonic() + 30
        while "listening on" not in log_path.read_text() and time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"bookd exited: {log_path.read_text()}")
            time.sleep(0.02)
        push.connect(ipc + "bookd")
        n_frames = len(stream.frames)

        def feed(conn_id: int, batch: int = 1) -> tuple[float, float]:
            msgs = stream.packed(conn_id)
            if batch > 1:  # as ingest forwards a busy socket's frames
                msgs = [pack_batch(msgs[k:k + batch]) for k in range(0, len(msgs), batch)]
            base = counter.n
            t0 = time.perf_counter()
            for m in msgs:
                push.send(m)
            t_sent = time.perf_counter()
            ok = counter.wait(base + n_frames, 120)
            if not ok:
                print(f"  warning: {counter.n - base} of {n_frames} events arrived",
                      file=sys.stderr)
            return (counter.n - base) / (counter.last - t0), t_sent - t0

        rate, send_s = feed(1)  # also warms bookd up (imports, allocations)
        rate, send_s = feed(2)
        result["bookd_msgs_per_s"] = rate
        result["sender_msgs_per_s"] = n_frames / send_s
        result["bookd_msgs_per_s_batched"] = max(feed(3, BATCH)[0], feed(4, BATCH)[0])
        result["frames_per_pass"] = n_frames

        def reader(fed: bool) -> tuple[float, float, int, float | None]:
            ready, q = spawn.Event(), spawn.Queue()
            child = spawn.Process(target=_reader_loop, args=(ns, PAIRS[0], reader_s, ready, q))
            child.start()
            ready.wait(30)
            rates = []
            conn = 10
            while fed and child.is_alive() and q.empty():
                conn += 1
                rates.append(feed(conn)[0])
            got = q.get(timeout=reader_s + 30)
            child.join(10)
            return (*got, statistics.median(rates) if rates else None)

        result["reader_idle_snapshots_per_s"], result["reader_idle_valid_fraction"], _, _ = \
            reader(False)
        (result["reader_fed_snapshots_per_s"], result["reader_fed_valid_fraction"],
         result["reader_fed_retries"], result["bookd_msgs_per_s_with_reader"]) = reader(True)
    finally:
        counter.stop.set()
        counter.join(5)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        result["bookd_exit_code"] = proc.returncode
        for s in (push, bus_in, ingest_ctl):
            s.close(0)
        ctx.term()
        unlink_namespace(ns, PAIRS)
    return result


# --------------------------------------------------------------------------- output

def print_table(a: dict, b: dict | None) -> None:
    print(f"(a) in-process BookKeeper.on_frame, {a['updates']} updates, "
          f"{a['levels_per_update']:.2f} levels and {a['bytes_per_update']:.0f} bytes each "
          f"(us of CPU per update; split from each configuration's best rep)")
    rows = [
        ("decode + apply + checksum (+ keeper logic)   [A]", "decode_apply_checksum_us"),
        ("render L2 event JSON                     [B - A]", "render_us"),
        ("publish to shm (BookWriter)              [C - B]", "publish_shm_us"),
        ("send on the PUSH socket                  [D - C]", "send_us"),
        ("  render + send", "render_send_us"),
        ("total per update                             [D]", "total_us"),
    ]
    print(f"  {'':<52} {'best':>8}    {'median':>8}")
    for name, key in rows:
        print(f"  {name:<52} {a['best'][key]:8.3f} us {a['median'][key]:8.3f} us")
    print(f"  {'  of A: decode_book + Book.apply alone (no keeper)':<52} "
          f"{a['core_best_us']:8.3f} us {a['core_median_us']:8.3f} us")
    print(f"  {f'unpack_inner, BATCHes of {BATCH} (service loop, extra)':<52} "
          f"{a['header_unpack_us']:8.3f} us")
    ev = a["events_and_mismatches"]
    print(f"  events/mismatches per config: {ev}; bus drops: {a['drops_bus']}")
    if b is None:
        return
    print(f"(b) python -m bookd, {b['frames_per_pass']} frames per pass")
    print(f"  {'bookd drain rate (events counted at bus.in)':<52} "
          f"{b['bookd_msgs_per_s']:10.0f} msgs/s  ({1e6 / b['bookd_msgs_per_s']:.1f} us/msg)")
    print(f"  {'bench sender rate (blocking PUSH)':<52} {b['sender_msgs_per_s']:10.0f} msgs/s")
    print(f"  {f'bookd drain rate, frames sent in BATCHes of {BATCH}':<52} "
          f"{b['bookd_msgs_per_s_batched']:10.0f} msgs/s  "
          f"({1e6 / b['bookd_msgs_per_s_batched']:.1f} us/msg)")
    wr = b["bookd_msgs_per_s_with_reader"]
    if wr:
        print(f"  {'bookd drain rate while a reader spins':<52} {wr:10.0f} msgs/s")
    print(f"(c) BookReader.snapshot() in another process ({PAIRS[0]})")
    print(f"  {'bookd idle':<52} {b['reader_idle_snapshots_per_s']:10.0f} /s "
          f"(valid {b['reader_idle_valid_fraction']:.0%})")
    print(f"  {'bookd being fed':<52} {b['reader_fed_snapshots_per_s']:10.0f} /s "
          f"(valid {b['reader_fed_valid_fraction']:.0%}, seqlock retries "
          f"{b['reader_fed_retries']})")
    print(f"  bookd exit code after SIGTERM: {b['bookd_exit_code']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=10000, help="updates for (a)")
    ap.add_argument("--process-frames", type=int, default=60000, help="updates per pass, (b)")
    ap.add_argument("--reps", type=int, default=9, help="repetitions of (a)")
    ap.add_argument("--reader-seconds", type=float, default=2.0, help="duration of (c) runs")
    ap.add_argument("--seed", type=int, default=1, help="synthetic market seed")
    ap.add_argument("--no-process", action="store_true", help="skip (b) and (c)")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="kfb")
    try:
        print(f"bench_bookd: Python {sys.version.split()[0]}, {len(PAIRS)} pairs at depth "
              f"{DEPTH}, load average {os.getloadavg()[0]:.2f}")
        a = bench_inprocess(Stream(args.frames, args.seed), args.reps, tmp)
        b = None
        if not args.no_process:
            b = bench_process(Stream(args.process_frames, args.seed), args.reader_seconds, tmp)
        print_table(a, b)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps({"inprocess": a, "process": b}, default=lambda x: round(x, 4)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
