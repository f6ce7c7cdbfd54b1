"""bookd's shared memory across processes: seqlock under load, crashes, restarts, tools.

Every test works in its own namespace (never containing "krakenfeed") and the `ns`
fixture removes whatever is left under it in /dev/shm, even after a failure or a kill.
Child processes are forked before the parent maps anything, so writer and reader share
nothing but the segment names. Figures (reads, torn reads, retries, delays) are printed,
not asserted, except the 1.5 s stale limit, which is the reader API's contract.
"""

from __future__ import annotations

import glob
import multiprocessing as mp
import os
import signal
import stat
import subprocess
import sys
import time
import traceback
import uuid
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from bookd.layout import (
    D_PID,
    P_EXCHANGE_TS,
    P_PAYLOAD,
    P_RECV_NS,
    PAYLOAD_HEAD,
    AttachTimeout,
    BookState,
    NamespaceBusy,
    SeqlockBusy,
    ViewExpired,
    WriterClosed,
    pair_geometry,
    pair_segment_name,
)
from bookd.reader import BookReader, BookView
from bookd.shm import BookWriter, ReadOnlyMapping
from ingest.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CTX = mp.get_context("fork")  # fast to start; children only touch their own objects
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
DEPTH = 10
PAIR = "BTC/USD"
TORN_SECONDS = 2.0
MIN_READS = 1000  # the torn-read tests want at least this many reads as evidence


@pytest.fixture
def ns():
    name = f"t{os.getpid()}_{uuid.uuid4().hex[:6]}"
    assert "krakenfeed" not in name
    yield name
    for path in glob.glob(f"/dev/shm/{glob.escape(name)}.*"):
        os.unlink(path)


def _names(ns: str) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(f"/dev/shm/{glob.escape(ns)}.*"))


def _book(k: int, n: int = DEPTH) -> tuple[list[int], list[int], list[int], list[int]]:
    """A recognisable book: bids 500001, 500000, ... asks 500002, ... (precision 1)."""
    return ([500001 - i for i in range(n)], [k + i for i in range(n)],
            [500002 + i for i in range(n)], [k + 100 + i for i in range(n)])


def _publish(w: BookWriter, i: int, k: int = 1) -> None:
    w.set_precision(i, 1, 8)
    w.publish(i, *_book(k), checksum=1234, exchange_ts_ns=k, recv_ns=time.time_ns())


def _pump(w: BookWriter, proc: subprocess.Popen, timeout: float = 30.0) -> tuple[str, str]:
    """Keep the writer's heartbeat going while a child process runs; its output."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        w.heartbeat()
        time.sleep(0.05)
    out, err = proc.communicate(timeout=5)
    return out, err


def _wait(pred, timeout: float, step: float = 0.01) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            break
        time.sleep(step)
    return time.monotonic() - t0


# --------------------------------------------------------------------------- child processes


def _flat_out_writer(ns: str, pair: str, depth: int, mode: str, ready, stop, out) -> None:
    """Publish as fast as possible books whose every value is the write counter k.

    mode "publish": BookWriter.publish (one pack, one memcpy), with level counts that
    also depend on k. mode "steps": the same values written in six separate steps
    inside the writer's seqlock, to widen the window in which a reader can tear (with a
    short pause between writes, as bookd decodes and checks between publishes; without
    it a seqlock reader starves, which is the protocol's known trade-off).
    """
    w = BookWriter(ns, [pair], depth, heartbeat_ms=50)
    k = 1
    try:
        w.set_precision(0, 1, 8)
        ones = [1] * depth
        w.publish(0, ones, ones, ones, ones, checksum=1, exchange_ts_ns=1, recv_ns=1)
        ready.set()
        if mode == "publish":
            while not stop.is_set():
                for _ in range(256):
                    k += 1
                    nb, na = depth - k % 3, depth - (k + 1) % 3
                    v = [k] * depth
                    w.publish(0, v[:nb], v[:nb], v[:na], v[:na], checksum=k & 0xFFFFFFFF,
                              exchange_ts_ns=k, recv_ns=k)
                w.heartbeat()
        else:
            pw = w._writers[0]  # deliberately slow writer built on the writer's own seqlock
            arr = np.frombuffer(pw.mv, dtype=np.uint64, count=4 * depth,
                                offset=pair_geometry(depth).bid_prices)
            try:
                while not stop.is_set():
                    for _ in range(256):
                        k += 1
                        for _ in range(30):  # bookd's other work between two publishes
                            pass
                        pw.lock.begin()
                        pw.u64[P_EXCHANGE_TS // 8] = k
                        for s in range(4):
                            arr[s * depth:(s + 1) * depth] = k
                        pw.u64[P_RECV_NS // 8] = k
                        pw.lock.end()
                    w.heartbeat()
            finally:
                del arr
        out.put(k)
    finally:
        w.close()


def _torn(mode: str, depth: int, ets: int, recv: int, checksum: int,
          bids: np.ndarray, asks: np.ndarray) -> bool:
    """True if the book mixes two writes (every value must encode the same k)."""
    k = ets
    if k <= 1:
        return recv != k  # the initial book
    if recv != k:
        return True
    if mode == "publish":
        if checksum != k & 0xFFFFFFFF:
            return True
        if len(bids) != depth - k % 3 or len(asks) != depth - (k + 1) % 3:
            return True
    elif len(bids) != depth or len(asks) != depth:
        return True
    return not (bool((bids == k).all()) and bool((asks == k).all()))


def _torn_reader(ns: str, pair: str, depth: int, seconds: float, validated: bool, mode: str,
                 out) -> None:
    try:
        reader = BookReader.attach(pair, timeout=20, namespace=ns)
        reads = torn = views = busy = 0
        end = time.monotonic() + seconds
        late = end + 30  # a starved reader (loaded CI box) goes on until it has evidence

        def more() -> bool:
            now = time.monotonic()
            return now < end or (reads < MIN_READS and now < late)

        if validated:  # the API: snapshot() copies and zero-copy views, both validated
            def grab(v: BookView) -> tuple:  # copies only: short, so it fits between writes
                nb, na = v.n_bids, v.n_asks
                return (v.exchange_ts_ns, v.recv_ns, v.checksum,
                        v.bid_prices[:nb].copy(), v.bid_qtys[:nb].copy(),
                        v.ask_prices[:na].copy(), v.ask_qtys[:na].copy())
            with reader.view() as view:
                while more():
                    for _ in range(32):
                        s = reader.snapshot()
                        torn += _torn(mode, depth, s.exchange_ts_ns, s.recv_ns, s.checksum,
                                      s.bids, s.asks)
                        reads += 1
                        # A writer that never pauses longer than `grab` takes can starve
                        # consistent() (the documented SeqlockBusy); that is not a tear.
                        try:
                            ets, recv, ck, bp, bq, ap, aq = view.consistent(grab, tries=1000)
                        except SeqlockBusy:
                            busy += 1
                            continue
                        torn += _torn(mode, depth, ets, recv, ck, np.stack((bp, bq), axis=1),
                                      np.stack((ap, aq), axis=1))
                        reads += 1
                        views += 1
            retries = reader.retries
        else:  # the control: the same copy and parse, without the counter check
            m = ReadOnlyMapping.open(pair_segment_name(ns, pair))
            src = m.buf[P_PAYLOAD:pair_geometry(depth).size]
            while more():
                for _ in range(64):
                    data = src.tobytes()
                    head = PAYLOAD_HEAD.unpack_from(data)
                    nb, na, checksum, ets, recv = head[5], head[6], head[7], head[8], head[9]
                    lv = np.frombuffer(data, np.uint64, offset=PAYLOAD_HEAD.size)
                    lv = lv.reshape(4, depth)
                    reads += 1
                    torn += _torn(mode, depth, ets, recv, checksum, lv[0:2, :nb].T,
                                  lv[2:4, :na].T)
            retries = views = busy = 0
            src.release()
            m.close()
        reader.close()
        out.put((reads, torn, retries, views, busy))
    except BaseException:
        out.put(traceback.format_exc())


def _live_writer(ns: str, pairs: list[str], depth: int, ready) -> None:
    """A bookd stand-in that publishes one book per pair and then only heartbeats."""
    w = BookWriter(ns, pairs, depth, heartbeat_ms=50)
    for i in range(len(pairs)):
        _publish(w, i)
    ready.set()
    while True:
        time.sleep(0.05)
        w.heartbeat()


def _run_torn(ns: str, mode: str, validated: bool) -> tuple[int, int, int, int, int, int]:
    """(reads, torn, seqlock retries, zero-copy view reads, starved views, writes)."""
    ready, stop = CTX.Event(), CTX.Event()
    wq, rq = CTX.Queue(), CTX.Queue()
    wp = CTX.Process(target=_flat_out_writer, args=(ns, PAIR, DEPTH, mode, ready, stop, wq))
    rp = CTX.Process(target=_torn_reader,
                     args=(ns, PAIR, DEPTH, TORN_SECONDS, validated, mode, rq))
    wp.start()
    rp.start()  # attach() waits for the writer's segments
    try:
        assert ready.wait(30), "writer process did not start"
        result = rq.get(timeout=TORN_SECONDS + 90)
        assert isinstance(result, tuple), f"reader failed:\n{result}"
        stop.set()
        writes = wq.get(timeout=30)
        return (*result, writes)
    finally:
        stop.set()
        for p in (rp, wp):
            if p.pid is not None:
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join(5)


# --------------------------------------------------------------------------- (a), (b)


@pytest.mark.parametrize("mode", ["publish", "steps"])
def test_no_torn_snapshot_under_a_full_speed_writer(ns: str, mode: str) -> None:
    reads, torn, retries, views, busy, writes = _run_torn(ns, mode, validated=True)
    print(f"\n[{mode} writer] {writes} writes; {reads} validated reads ({views} of them "
          f"zero-copy views; {busy} views gave up after 1000 tries) in about "
          f"{TORN_SECONDS:g} s, {retries} seqlock retries, {torn} torn")
    assert writes > 1000 and reads >= MIN_READS  # the reader goes on until it has them
    assert torn == 0
    assert _names(ns) == []


def test_control_without_the_seqlock_sees_torn_reads(ns: str) -> None:
    """Proves the detector works: the same reads without validation do tear."""
    reads, torn, _, _, _, writes = _run_torn(ns, "steps", validated=False)
    print(f"\n[control, steps writer] {writes} writes, {reads} unvalidated reads, "
          f"{torn} torn ({100 * torn / max(reads, 1):.1f}%)")
    assert reads > 1000
    assert torn > 0


# --------------------------------------------------------------------------- (c)


def test_kill9_reader_goes_stale_then_a_new_writer_reclaims(ns: str) -> None:
    pairs = ["BTC/USD", "ETH/USD"]
    ready = CTX.Event()
    wp = CTX.Process(target=_live_writer, args=(ns, pairs, DEPTH, ready), daemon=True)
    wp.start()
    reader = None
    try:
        assert ready.wait(30)
        reader = BookReader.attach(PAIR, timeout=10, namespace=ns)
        assert reader.state is BookState.VALID
        old_generation = reader.generation
        seg = f"/dev/shm/{pair_segment_name(ns, PAIR)}"
        old_inode = os.stat(seg).st_ino
        with pytest.raises(NamespaceBusy) as busy:
            BookWriter(ns, pairs, DEPTH)
        assert str(wp.pid) in str(busy.value)

        os.kill(wp.pid, signal.SIGKILL)  # not reaped yet: a zombie until join()
        elapsed = _wait(lambda: reader.state is BookState.STALE, timeout=5)
        print(f"\nreader saw STALE {elapsed * 1e3:.0f} ms after kill -9")
        assert reader.state is BookState.STALE and elapsed < 1.5
        snap = reader.snapshot()
        assert snap.state is BookState.STALE and snap.segment_state is BookState.VALID
        assert snap.best_bid == (Decimal("50000.1"), Decimal("0.00000001"))
        assert len(_names(ns)) == 3  # kill -9 ran no cleanup: leftovers stay

        top = subprocess.run([sys.executable, "-m", "bookd.top", "--once", "--namespace", ns],
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
        assert top.returncode == 1
        assert f"pid {wp.pid} is dead" in top.stderr and ns in top.stderr

        w2 = BookWriter(ns, pairs, DEPTH)  # reclaims the crashed writer's segments
        try:
            assert w2.generation > old_generation
            assert os.stat(seg).st_ino != old_inode
            _publish(w2, 0, k=7)
            w2.heartbeat()

            def moved() -> bool:
                s = reader.snapshot()
                return s.generation == w2.generation and s.state is BookState.VALID
            elapsed = _wait(moved, timeout=5)
            print(f"reader on the new generation after {elapsed * 1e3:.0f} ms")
            snap = reader.snapshot()
            assert snap.generation == w2.generation and snap.state is BookState.VALID
            assert snap.exchange_ts_ns == 7 and reader.reattaches == 1
        finally:
            w2.close()
        assert _names(ns) == []
    finally:
        if reader is not None:
            reader.close()
        if wp.is_alive():
            wp.kill()
        wp.join(5)


# --------------------------------------------------------------------------- (d)


@pytest.mark.parametrize("final", [BookState.HALTED, BookState.STALE])
def test_clean_close_final_state_unlink_and_restart(ns: str, final: BookState) -> None:
    pairs = ["BTC/USD", "ETH/USD"]
    w = BookWriter(ns, pairs, DEPTH)
    reader = None
    try:
        names = _names(ns)
        assert names == sorted([f"{ns}.books", f"{ns}.book.BTC_USD", f"{ns}.book.ETH_USD"])
        for name in names:
            assert stat.S_IMODE(os.stat(f"/dev/shm/{name}").st_mode) == 0o600
        _publish(w, 0)
        reader = BookReader.attach(PAIR, timeout=5, namespace=ns)
        before = reader.snapshot()
        assert before.state is BookState.VALID
        assert before.bids_decimal()[:2] == [(Decimal("50000.1"), Decimal("1E-8")),
                                            (Decimal("50000.0"), Decimal("2E-8"))]

        w.close(final)
        assert _names(ns) == []
        assert reader.state is final
        snap = reader.snapshot()
        assert snap.state is final and snap.segment_state is final
        assert snap.best_bid == before.best_bid and snap.best_ask == before.best_ask
        with pytest.raises(AttachTimeout) as info:
            BookReader.attach(PAIR, timeout=0.3, namespace=ns)
        assert isinstance(info.value, TimeoutError)
        assert PAIR in str(info.value) and ns in str(info.value)
        with pytest.raises(WriterClosed):
            _publish(w, 0)

        # bookd starts again, even with another depth: the attached reader follows
        w2 = BookWriter(ns, ["BTC/USD"], 25)
        try:
            w2.set_precision(0, 1, 8)
            w2.publish(0, [600000], [5], [600001], [6], checksum=9, exchange_ts_ns=3,
                       recv_ns=time.time_ns())
            _wait(lambda: reader.generation == w2.generation, timeout=5)
            snap = reader.snapshot()
            assert (snap.generation, snap.depth, snap.state) == (w2.generation, 25,
                                                                BookState.VALID)
            assert snap.best_bid == (Decimal("60000.0"), Decimal("5E-8"))
        finally:
            w2.close()
    finally:
        if reader is not None:
            reader.close()
        w.close()
    assert _names(ns) == []


def test_view_lifetime_and_generation_change(ns: str) -> None:
    w = BookWriter(ns, [PAIR], DEPTH)
    reader = None
    try:
        _publish(w, 0)
        reader = BookReader.attach(PAIR, timeout=5, namespace=ns)
        with reader.view() as v:
            assert v.consistent(lambda v: (int(v.bid_prices[0]), v.n_bids, v.price_precision)) \
                == (500001, DEPTH, 1)
            assert not v.bid_prices.flags.writeable  # mapped read-only
            with pytest.raises(ValueError):
                v.bid_prices[0] = 1
            kept = v.ask_prices
            t = v.begin()
            _publish(w, 0, k=5)  # a write between begin and validate
            assert not v.validate(t)
            assert v.state is BookState.VALID
        with pytest.raises(ViewExpired):
            v.bid_prices  # noqa: B018
        assert int(kept[0]) == 500002  # escaped arrays stay memory-safe

        with reader.view() as v:
            w.close()
            w = BookWriter(ns, [PAIR], DEPTH)  # a restart while the view is open
            _publish(w, 0, k=9)
            _wait(lambda: reader.generation == w.generation, timeout=5)
            with pytest.raises(ViewExpired):
                v.consistent(lambda v: int(v.bid_prices[0]))
        assert reader.snapshot().exchange_ts_ns == 9
        with reader.view() as v:
            assert v.generation == w.generation and v.exchange_ts_ns == 9
    finally:
        if reader is not None:
            reader.close()
        w.close()
    assert _names(ns) == []


def test_writer_dead_mid_write_reads_stale_without_hanging(ns: str) -> None:
    """A writer that died with the seqlock counter odd: STALE, no levels, no hang."""
    w = BookWriter(ns, [PAIR], DEPTH)
    reader = None
    try:
        _publish(w, 0)
        reader = BookReader.attach(PAIR, timeout=5, namespace=ns)
        pw = w._writers[0]
        pw.lock.begin()                    # the writer "dies" in the middle of a write:
        w._dir_u32[D_PID // 4] = 0         # failure injection, the reader sees no writer
        t0 = time.monotonic()
        snap = reader.snapshot()
        print(f"\nsnapshot gave up after {(time.monotonic() - t0) * 1e3:.1f} ms")
        assert snap.state is BookState.STALE and len(snap.bids) == len(snap.asks) == 0
        with reader.view() as v, pytest.raises(SeqlockBusy):
            v.begin()
        with pytest.raises(SeqlockBusy):
            reader.read_payload()
        pw.lock.end()
        assert reader.snapshot().best_bid == (Decimal("50000.1"), Decimal("1E-8"))
    finally:
        if reader is not None:
            reader.close()
        w.close()


# --------------------------------------------------------------------------- (e)


def test_a_reader_process_exiting_leaves_the_segments_alone(ns: str) -> None:
    w = BookWriter(ns, [PAIR], DEPTH)
    try:
        _publish(w, 0)
        inodes = {n: os.stat(f"/dev/shm/{n}").st_ino for n in _names(ns)}
        proc = subprocess.Popen(
            [sys.executable, "examples/strategy_reader.py", "--namespace", ns, "--pair", PAIR,
             "--seconds", "1"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        out, err = _pump(w, proc)
        assert proc.returncode == 0, err
        assert f"{PAIR} valid  bid 50000.1  ask 50000.2  mid 50000.15" in out
        assert "leaked" not in err
        t_end = time.monotonic() + 0.5  # a resource tracker would unlink right after exit
        while time.monotonic() < t_end:
            w.heartbeat()
            time.sleep(0.05)
        assert {n: os.stat(f"/dev/shm/{n}").st_ino for n in _names(ns)} == inodes
        with BookReader.attach(PAIR, timeout=1, namespace=ns) as reader:
            assert reader.generation == w.generation and reader.state is BookState.VALID
    finally:
        w.close()


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="SharedMemory(track=False) exists")
def test_control_plain_shared_memory_attach_does_unlink_on_exit(ns: str) -> None:
    """The pitfall is real here: attaching with plain SharedMemory destroys the book."""
    w = BookWriter(ns, [PAIR], DEPTH)
    try:
        name = pair_segment_name(ns, PAIR)
        code = ("import sys; from multiprocessing.shared_memory import SharedMemory; "
                "SharedMemory(sys.argv[1]).close()")
        done = subprocess.run([sys.executable, "-c", code, name], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        gone = _wait(lambda: not os.path.exists(f"/dev/shm/{name}"), timeout=5)
        print(f"\nplain SharedMemory reader's exit unlinked /{name} after {gone * 1e3:.0f} ms")
        assert not os.path.exists(f"/dev/shm/{name}")
    finally:
        w.close()  # copes with the name being gone
    assert _names(ns) == []


# --------------------------------------------------------------------------- (f)


def _top(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bookd.top", "--once", *args], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=60)


def test_top_once(ns: str) -> None:
    done = _top("--namespace", ns)
    assert done.returncode == 1
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1
    assert "no bookd running" in done.stderr and ns in done.stderr

    pairs = list(load_config(ROOT / "etc" / "krakenfeed.toml").trading.pairs)
    w = BookWriter(ns, pairs, DEPTH)
    try:
        _publish(w, 0)
        if len(pairs) > 1:
            _publish(w, 1)
            w.set_state(1, BookState.RESYNCING)
        proc = subprocess.Popen([sys.executable, "-m", "bookd.top", "--once", "--namespace", ns],
                                cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        out, err = _pump(w, proc)
        print("\n" + out)
        assert proc.returncode == 0, err
        lines = out.strip().splitlines()
        assert lines[0].split() == ["PAIR", "BID", "ASK", "SPREAD", "STATE", "AGE"]
        rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
        assert list(rows) == pairs  # default pairs come from the config
        assert rows[pairs[0]][1:5] == ["50000.1", "50000.2", "0.1", "valid"]
        if len(pairs) > 1:
            assert rows[pairs[1]][4] == "resyncing"
        for p in pairs[2:]:
            assert rows[p][1:5] == ["-", "-", "-", "empty"]

        proc = subprocess.Popen([sys.executable, "-m", "bookd.top", "--once", "--namespace", ns,
                                 "--pair", pairs[0], "--pair", "DOGE/EUR"], cwd=ROOT, env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = _pump(w, proc)
        assert proc.returncode == 0, err
        rows = {ln.split()[0]: ln.split() for ln in out.strip().splitlines()[1:]}
        assert list(rows) == [pairs[0], "DOGE/EUR"] and rows["DOGE/EUR"][4] == "absent"
    finally:
        w.close()
