"""The whole system under a real supervisord: start-up, every replay fault end to end,
kill -9 of each process, the ordered halt, and a clean stop.

One shared system takes the faults that do not stop it; kill and halt tests get their
own short-lived systems. Limits are shrunken (liveness 2 s, backoff 0.1-0.5 s).
Recovery and halt times are printed (run with -s to see them), never asserted tightly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bookd.book import Book
from bookd.layout import BookState
from bus.schema import decimal_to_ticks
from tests.system.sysharness import REPO, System, system_event, wait_for

pytestmark = pytest.mark.system

PAIRS = ("BTC/USD", "ETH/USD", "SOL/USD")


def l2_events(events, pair=None):
    return [(t, env) for t, topic, env in events
            if topic.startswith("book.") and (pair is None or env["event"]["pair"] == pair)]


def checksum_of(ev: dict) -> int:
    """Recompute Kraken's checksum from an event's decimal levels with the book core."""
    pp, qp = ev["price_precision"], ev["qty_precision"]
    book = Book(ev["pair"], max(ev["depth"], 10), pp, qp)
    return book.apply(True, [(decimal_to_ticks(p, pp)[0], decimal_to_ticks(q, qp)[0])
                             for p, q in ev["bids"]],
                      [(decimal_to_ticks(p, pp)[0], decimal_to_ticks(q, qp)[0])
                       for p, q in ev["asks"]])


@pytest.fixture(scope="module")
def system():
    s = System(PAIRS)
    try:
        yield s.start()
    finally:
        s.cleanup()


def test_starts_books_valid_and_events_flow(system):
    t0 = time.monotonic()
    for pair in PAIRS:
        system.sub.wait(t0, lambda topic, env, p=pair: topic == f"book.{p}", 10,
                        f"a book event for {pair}")
    events = l2_events(system.sub.since(0))
    assert events
    for _, env in events:
        assert checksum_of(env["event"]) == env["event"]["checksum"]
    with system.reader("BTC/USD") as r:
        snap = r.snapshot()
        assert snap.state == BookState.VALID and snap.best_bid < snap.best_ask


def test_corrupt_once_resyncs_only_that_pair(system):
    t0 = time.monotonic()
    system.control().fault("corrupt:pair=BTC/USD,count=once")
    resync = system.sub.wait(t0, system_event("RESYNCING", "BTC/USD"), 10, "RESYNCING")[0]
    valid = system.sub.wait(resync[0], system_event("VALID", "BTC/USD"), 15, "VALID again")[0]
    during = [e for e in system.sub.since(resync[0]) if e[0] <= valid[0]]
    assert not l2_events(during, "BTC/USD"), "a BTC/USD book left bookd while resyncing"
    assert l2_events(system.sub.since(t0), "ETH/USD"), "other pairs must keep flowing"
    assert not system.sub.find(t0, system_event("RESYNCING", "ETH/USD"))
    for _, env in l2_events(system.sub.since(t0)):
        assert checksum_of(env["event"]) == env["event"]["checksum"]
    print(f"\ncorrupt once: RESYNCING -> VALID in {valid[0] - resync[0]:.2f} s")


def test_silenced_pair_alone_goes_stale_and_resubscribes(system):
    t0 = time.monotonic()
    system.control().fault("silence:pair=ETH/USD,seconds=3")
    system.sub.wait(t0, system_event("STALE", "ETH/USD", "ingest"), 10, "ETH/USD STALE")
    t1 = time.monotonic()
    system.sub.wait(t1, lambda topic, env: topic == "book.ETH/USD" and env["event"]["snapshot"],
                    15, "a fresh ETH/USD snapshot")
    assert not system.sub.find(t0, system_event("STALE", "BTC/USD", "ingest"))
    assert not system.sub.find(t0, system_event("DISCONNECTED", service="ingest"))
    assert l2_events(system.sub.since(t0), "SOL/USD")


def test_data_stall_with_heartbeats_is_stale_not_a_reconnect(system):
    t0 = time.monotonic()
    system.control().fault("stall:seconds=3")
    for pair in PAIRS:
        system.sub.wait(t0, system_event("STALE", pair, "ingest"), 10, f"{pair} STALE")
    system.wait_all_valid(20)
    assert not system.sub.find(t0, system_event("DISCONNECTED", service="ingest"))


def test_status_changes_become_system_events(system):
    t0 = time.monotonic()
    ctl = system.control()
    for code in ("maintenance", "cancel_only", "online"):
        ctl.fault(f"status:system={code}")
        system.sub.wait(t0, system_event(code), 10, f"status {code}")


def test_garbage_is_counted_and_nothing_else_disturbed(system):
    def decode_errors():
        stats = [env["event"] for _, topic, env in system.sub.since(0)
                 if topic == "stats" and env["event"]["process"] == "ingest"]
        return stats[-1]["counters"]["decode_errors"] if stats else None

    before = wait_for(lambda: decode_errors() is not None and (decode_errors(),), 10,
                      what="an ingest StatsEvent")[0]
    t0 = time.monotonic()
    system.control().fault("garbage")
    wait_for(lambda: (decode_errors() or 0) > before, 10, what="decode_errors to grow")
    assert not system.sub.find(t0, system_event("DISCONNECTED", service="ingest"))
    assert all(s == BookState.VALID for s in system.states().values())


def test_dropped_connection_reconnects_with_fresh_snapshots(system):
    old = {env["event"]["conn_id"] for _, env in l2_events(system.sub.since(0))}
    t0 = time.monotonic()
    system.control().fault("drop")
    system.sub.wait(t0, system_event("CONNECTED", service="ingest"), 15, "reconnect")
    new = system.sub.wait(
        t0, lambda topic, env: topic.startswith("book.") and env["event"]["conn_id"] not in old
        and env["event"]["snapshot"], 15, "a snapshot on the new connection")
    system.wait_all_valid(15)
    print(f"\ndrop: fresh snapshot {new[0][0] - t0:.2f} s after the drop")


def test_everything_stalled_reconnects(system):
    t0 = time.monotonic()
    system.control().fault("stall-all:seconds=6")
    system.sub.wait(t0, system_event("DISCONNECTED", service="ingest"), 10,
                    "a reconnect after max_heartbeat_interval_s")
    t1 = time.monotonic()
    system.sub.wait(t1, system_event("CONNECTED", service="ingest"), 20, "connected again")
    system.wait_all_valid(20)
    assert not system.halt_file().exists()


def _recovery(system: System, name: str) -> float:
    """kill -9 one program; seconds until the system is whole again."""
    old_pid = system.pid(name)
    readers = {p: system.reader(p) for p in PAIRS}
    gens = {p: r.generation for p, r in readers.items()}
    t0 = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)
    if name == "bookd":  # before supervisord respawns it: readers must see it died
        seen = set()
        wait_for(lambda: seen.update(p for p, r in readers.items()
                                     if r.state == BookState.STALE) or len(seen) == len(PAIRS),
                 5, interval=0.01, what="readers to report stale after bookd died")
    wait_for(lambda: system.pid(name) not in (0, old_pid), 20, what=f"{name} respawned")
    if name == "bookd":
        wait_for(lambda: all(r.snapshot().state == BookState.VALID and r.generation != gens[p]
                             for p, r in readers.items()), 30, what="new generation valid")
    elif name == "bus":
        sub_t = time.monotonic()
        epochs_before = {env["epoch"] for _, _, env in system.sub.since(0)}
        system.sub.wait(sub_t, lambda topic, env: env["epoch"] not in epochs_before, 20,
                        "a new bus epoch")
    else:
        system.sub.wait(t0, system_event("CONNECTED", service="ingest"), 20, "ingest reconnect")
        wait_for(lambda: all(r.snapshot().state == BookState.VALID for r in readers.values()),
                 30, what="books valid after ingest restart")
    t1 = time.monotonic()
    system.sub.wait(t1, lambda topic, env: topic.startswith("book."), 20, "book events again")
    took = time.monotonic() - t0
    for r in readers.values():
        r.close()
    return took


def test_kill9_each_process_recovers_then_clean_stop():
    s = System(PAIRS)
    try:
        s.start()
        times = {name: _recovery(s, name) for name in ("ingest", "bookd", "bus")}
        print("\nrecovery after kill -9: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
        assert not s.halt_file().exists(), "one kill of each program must not halt"
        s.stop()
        assert s.proc.returncode == 0
        alive, segs = s.leftovers()
        assert alive == [] and segs == [], f"orphans {alive}, segments {segs}"
    finally:
        s.cleanup()


def test_corruption_always_halts_in_order():
    s = System(PAIRS, exit_on_halt=True)
    try:
        s.start()
        readers = {p: s.reader(p) for p in PAIRS}
        t0 = time.monotonic()
        s.control().fault("corrupt:pair=BTC/USD,count=always")
        wait_for(s.halt_file().exists, 60, what="run/halt.json")
        t_halt = time.monotonic()
        assert "BTC/USD" in json.dumps(json.loads(s.halt_file().read_text())["decision"])
        assert s.proc.wait(60) == 0  # exit_on_halt shut supervisord down
        record = json.loads(s.halt_file().read_text())  # now with the stop results
        wait_for(lambda: all(r.state == BookState.HALTED for r in readers.values()), 10,
                 what="every book halted")
        order = [r["program"] for r in record.get("stop_results", [])]
        assert order[:3] == ["ingest", "bookd", "bus"], order
        halts = [env for _, topic, env in s.sub.since(0) if topic == "halt"] if s.sub else []
        print(f"\ncorrupt always: halt.json {t_halt - t0:.2f} s after arming; "
              f"HaltDecision on the bus: {bool(halts)}")
        for r in readers.values():
            r.close()
        alive, segs = s.leftovers()
        assert alive == [] and segs == []
    finally:
        s.cleanup()


def test_programs_started_by_hand_in_any_order_converge():
    s = System(PAIRS)
    procs = []
    try:
        (s.dir / "run").mkdir(exist_ok=True)
        py = sys.executable
        cmds = {
            "ingest": [py, "-m", "ingest", "--config", str(s.cfg), "--url", "replay"],
            "bookd": [py, "-m", "bookd", "--config", str(s.cfg)],
            "bus": [py, "-m", "bus", "--config", str(s.cfg)],
            "replay": [py, "-m", "replay", "--config", str(s.cfg), "--synthetic"],
        }
        for name in ("ingest", "bookd", "bus", "replay"):  # the reverse of the natural order
            log = open(s.dir / f"{name}.log", "w")
            procs.append(subprocess.Popen(cmds[name], cwd=REPO, stdout=log, stderr=log))
            time.sleep(0.3)
        s.wait_all_valid(40)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                assert p.wait(10) == 0
            except subprocess.TimeoutExpired:
                p.kill()
                raise
        s.cleanup()
