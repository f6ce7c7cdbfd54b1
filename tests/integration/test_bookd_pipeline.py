"""The book path end to end: replay server -> ingest -> bookd -> shared memory and bus.in.

Real processes (`python -m replay --synthetic`, `python -m ingest`, `python -m bookd`)
with a shrunken config from tests/integration/harness.py, a fake bus (the harness's
`FakeBus`: a PULL bound at `bus.in`) and `bookd.reader.BookReader`s. Every test has its
own namespace, run directory and temp dir, and removes every process, socket and shm
segment it made. Waits are bounded; nothing asserts how fast anything is.

Events from bookd reach the fake bus on one PUSH socket, so their order is bookd's order
(ingest's own events interleave but never reorder bookd's).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import msgspec

from bookd.checksum import checksum_levels
from bookd.layout import BookState
from bookd.reader import BookReader
from bus.schema import MarketDataL2Event, decimal_to_ticks
from ingest.config import Config, load_config

from .harness import FakeBus, Harness, LoggedPopen, stop_process, wait_for

PAIRS = ["BTC/USD", "ETH/USD", "SOL/USD"]
P = "ETH/USD"  # the pair whose checksum the replay server corrupts
OTHERS = [p for p in PAIRS if p != P]
OVERRIDES = {"bookd": {"stats_interval_s": 0.5}}


# --------------------------------------------------------------------------------------
# helpers

def shm_names(ns: str) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(f"/dev/shm/{glob.escape(ns)}.*"))


class Pipeline:
    """The processes of one test around a Harness (which stops them all)."""

    def __init__(self, h: Harness, cfg_path: Path) -> None:
        self.h = h
        self.path = cfg_path
        self.cfg: Config = load_config(cfg_path)
        self.ns = self.cfg.namespace
        assert "krakenfeed" not in self.ns
        self.bus: FakeBus = h.bus(self.cfg)
        self.readers: list[BookReader] = []
        self.replay = None
        self.ingest = None

    def start_feed(self) -> None:
        self.replay = self.h.replay(self.path, "--synthetic")
        self.ingest = self.h.ingest(self.path, self.replay.url)

    def start_bookd(self) -> LoggedPopen:
        proc = LoggedPopen([sys.executable, "-m", "bookd", "--config", str(self.path)],
                           ready_text="listening on ")
        self.h._procs.append(("bookd", proc))  # the harness stops it and shows its log
        assert proc.ready.wait(30) and proc.ready_line, f"bookd not ready:\n{proc.log()}"
        return proc

    def attach(self, pair: str) -> BookReader:
        r = BookReader.attach(pair, timeout=30, namespace=self.ns)
        self.readers.append(r)
        return r

    def all_valid(self, readers: list[BookReader]) -> bool:
        return all(r.state is BookState.VALID for r in readers)

    def bookd_stream(self, since: int = 0) -> list:
        """bookd's L2 and system events, in bookd's order."""
        return [e for e in self.bus.items[since:] if e.type == "MarketDataL2Event" or (
            e.type == "SystemStateEvent" and e.event["service_name"] == "bookd")]

    def l2(self, pair: str | None = None, since: int = 0) -> list[MarketDataL2Event]:
        return [msgspec.convert(e.event, MarketDataL2Event)
                for e in self.bus.events(type_name="MarketDataL2Event", since=since)
                if pair is None or e.event["pair"] == pair]

    def close(self) -> None:
        for r in self.readers:
            r.close()
        for name in shm_names(self.ns):  # only after a failure: a killed bookd's segments
            os.unlink(f"/dev/shm/{name}")


@contextlib.contextmanager
def pipeline():
    """A Pipeline whose processes, sockets, segments and temp dirs go away afterwards;
    on a failure the harness prints every process's log."""
    tmp = tempfile.mkdtemp(prefix="kf")
    pl = None
    try:
        with Harness(tmp) as h:
            pl = Pipeline(h, h.config(PAIRS, **OVERRIDES))
            try:
                yield pl
            finally:
                for r in pl.readers:  # before the harness stops bookd
                    r.close()
    finally:
        if pl is not None:
            pl.close()
        shutil.rmtree(tmp, ignore_errors=True)


def ticks(levels, precision_p: int, precision_q: int) -> list[tuple[int, int]]:
    return [(decimal_to_ticks(p, precision_p)[0], decimal_to_ticks(q, precision_q)[0])
            for p, q in levels]


def check_l2_events(pl: Pipeline) -> int:
    """Every L2 event so far is a correct book: checksum re-computed from its levels."""
    evs = pl.l2()
    for ev in evs:
        pp, qp = ev.price_precision, ev.qty_precision
        bids, asks = ticks(ev.bids, pp, qp), ticks(ev.asks, pp, qp)
        assert checksum_levels(asks, bids) == ev.checksum, ev
        assert [p for p, _ in bids] == sorted({p for p, _ in bids}, reverse=True)
        assert [p for p, _ in asks] == sorted({p for p, _ in asks})
        assert not bids or not asks or bids[0][0] < asks[0][0]
        assert len(bids) <= ev.depth and len(asks) <= ev.depth and ev.pair in PAIRS
    return len(evs)


def check_snapshot(r: BookReader) -> None:
    snap = r.snapshot()
    assert snap.state is BookState.VALID, snap.state
    bids, asks = snap.bids.tolist(), snap.asks.tolist()
    assert bids and asks and checksum_levels(asks, bids) == snap.checksum


class StatePoller(threading.Thread):
    """Snapshots one reader (owned by this thread) as fast as it can; records every
    state seen and every VALID snapshot whose levels do not match its checksum."""

    def __init__(self, reader: BookReader) -> None:
        super().__init__(daemon=True)
        self.reader = reader
        self.states: list[BookState] = []
        self.bad_valid = 0
        self.reads = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            snap = self.reader.snapshot()
            self.reads += 1
            if not self.states or self.states[-1] is not snap.state:
                self.states.append(snap.state)
            if snap.state is BookState.VALID and checksum_levels(
                    snap.asks.tolist(), snap.bids.tolist()) != snap.checksum:
                self.bad_valid += 1


# --------------------------------------------------------------------------------------
# the tests

def test_bookd_after_feed_valid_books_resync_one_pair_and_sigterm_stale():
    with pipeline() as pl:
        after_feed(pl)


def after_feed(pl: Pipeline) -> None:
    pl.start_feed()
    wait_for(lambda: pl.ingest.grep("connected to"), 30, "ingest connected")
    wait_for(lambda: pl.bus.events(type_name="MarketDataTradeEvent"), 30, "ingest's events")
    bookd = pl.start_bookd()  # after replay and ingest
    readers = [pl.attach(p) for p in PAIRS]
    wait_for(lambda: pl.all_valid(readers), 30, "every book VALID in shared memory")
    for r in readers:
        check_snapshot(r)
    wait_for(lambda: all(pl.l2(p) for p in PAIRS), 20, "L2 events of every pair")
    wait_for(lambda: pl.bus.stats("bookd"), 10, "a bookd StatsEvent")
    before = pl.bus.counter("resyncs", "bookd")
    mismatches = pl.bus.counter("mismatches", "bookd")

    # one corrupted checksum of P; slow acks keep the resync window open a while
    poller = StatePoller(pl.attach(P))
    pl.readers.remove(poller.reader)  # owned by the poller thread from here on
    poller.start()
    try:
        mark = len(pl.bus.items)
        pl.replay.fault("slow-acks:ms=300")
        pl.replay.fault(f"corrupt:pair={P},count=once")
        wait_for(lambda: pl.bus.system("RESYNCING", P, since=mark), 20, f"{P} RESYNCING")
        wait_for(lambda: pl.bus.system("VALID", P, since=mark), 20, f"{P} VALID again")
        pl.replay.control.clear()
        wait_for(lambda: pl.bus.counter("mismatches", "bookd") > mismatches, 10,
                 "bookd's mismatch counter")
        assert pl.bus.counter("resyncs", "bookd") > before
        wait_for(lambda: len(pl.l2(P, since=mark)) > 3, 10, f"{P} events again")
    finally:
        poller.stop.set()
        poller.join(5)
        poller.reader.close()
    assert pl.ingest.grep(f"bookd asks for fresh snapshots of {P} (checksum mismatch")
    assert BookState.RESYNCING in poller.states, poller.states
    assert poller.states[-1] is BookState.VALID and poller.bad_valid == 0

    # in bookd's order: RESYNCING(P) ... VALID(P) with no L2 of P between, others flowing
    stream = pl.bookd_stream(mark)
    kinds = [(e.type, e.event.get("status_code"), e.event["pair"]) for e in stream]
    i = kinds.index(("SystemStateEvent", "RESYNCING", P))
    j = kinds.index(("SystemStateEvent", "VALID", P), i)
    between = kinds[i + 1:j]
    assert ("MarketDataL2Event", None, P) not in between
    assert any(k == ("MarketDataL2Event", None, q) for k in between for q in OTHERS)
    after = [e.event for e in stream[j + 1:] if e.type == "MarketDataL2Event"
             and e.event["pair"] == P]
    assert after and after[0]["snapshot"] is True
    assert check_l2_events(pl) > 50

    # SIGTERM: exit 0, books marked stale, names unlinked
    assert stop_process(bookd) == 0, bookd.log()
    assert shm_names(pl.ns) == []
    for r in readers:
        assert r.state is BookState.STALE
        assert r.snapshot().segment_state is BookState.STALE


def test_bookd_first_kill9_restart_and_sigterm_halted():
    with pipeline() as pl:
        bookd_first(pl)


def bookd_first(pl: Pipeline) -> None:
    bookd = pl.start_bookd()  # before replay and ingest
    readers = [pl.attach(p) for p in PAIRS]
    assert all(r.snapshot().segment_state is BookState.EMPTY for r in readers)
    pl.start_feed()
    wait_for(lambda: pl.all_valid(readers), 30, "every book VALID in shared memory")
    wait_for(lambda: all(pl.l2(p) for p in PAIRS), 20, "L2 events of every pair")
    gen0 = readers[0].generation
    segments = shm_names(pl.ns)
    assert len(segments) == len(PAIRS) + 1

    # kill -9: attached readers see STALE; the segments stay until the next bookd
    bookd.kill()
    bookd.wait(10)
    wait_for(lambda: all(r.state is BookState.STALE for r in readers), 10, "STALE after kill")
    assert shm_names(pl.ns) == segments
    mark, lines = len(pl.bus.items), len(pl.ingest.lines)
    bookd = pl.start_bookd()  # reclaims the namespace, asks ingest for everything again
    wait_for(lambda: pl.all_valid(readers), 30, "VALID again after the restart")
    assert all(r.generation != gen0 and r.reattaches == 1 for r in readers)
    for r in readers:
        check_snapshot(r)
    assert bookd.grep("reclaimed namespace")
    # The books may be VALID before ingest logs this request: a resync ingest started
    # for the killed bookd can deliver its PairInfos and snapshots to the new one first.
    wait_for(lambda: any("bookd asks for fresh snapshots of BTC/USD, ETH/USD, SOL/USD "
                         "(bookd started)" in line for line in pl.ingest.lines[lines:]),
             10, "ingest taking the restarted bookd's request")
    wait_for(lambda: all(len(pl.l2(p, since=mark)) >= 3 for p in PAIRS), 20,
             "events of every pair after the restart")
    assert pl.ingest.poll() is None and pl.replay.proc.poll() is None
    assert check_l2_events(pl) >= 3 * len(PAIRS)

    # halt.json present: SIGTERM marks every book halted
    (pl.cfg.run_path / "halt.json").write_text('{"reason": "test"}\n')
    assert stop_process(bookd) == 0, bookd.log()
    assert shm_names(pl.ns) == []
    for r in readers:
        assert r.state is BookState.HALTED
        assert r.snapshot().segment_state is BookState.HALTED
