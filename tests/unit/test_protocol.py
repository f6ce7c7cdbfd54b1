"""ingest.protocol.KrakenSession driven by recorded frames, a fake Kraken and a fake clock.

`Sim` is a tiny discrete-event loop standing in for the I/O shell: it executes the
session's actions (Send goes to `FakeKraken`, which answers like Kraken: one ack per
symbol echoing req_id, snapshots, "Exceeded msg rate" past its limit), delivers frames
at their time, and calls `on_timer` when the ScheduleWake comes due. No sockets, no
sleeping: simulated minutes take milliseconds.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import random
from pathlib import Path

import msgspec
import pytest

from bus.schema import MarketDataOHLCVEvent, PotentialHaltTriggerEvent, SystemStateEvent
from ingest.actions import Close, Connect, ForwardBook, Log, Publish, ScheduleWake, Send, ToBookd
from ingest.config import load_config_text
from ingest.messages import ConnectionState, PairInfo, Stale
from ingest.protocol import KrakenSession, SessionState
from ingest.subscriptions import BOOK, SubKey, SubState
from ingest.wire import peek_channel, peek_symbol

S = 1_000_000_000
MS = 1_000_000
T0 = 1_800_000_000 * S
VECTOR = Path(os.environ.get("KRAKENFEED_VECTORS", Path(__file__).resolve().parents[3]
                             / "shared" / "kraken" / "vectors")) / \
    "depthcharge_kraken_minagbp_d25_20260816.ndjson"
HEARTBEAT = b'{"channel":"heartbeat"}'
REFUSAL = (b'{"error":"Subscription depth not supported","method":"subscribe","success":false,'
           b'"time_in":"2026-08-16T23:54:19.629313Z","time_out":"2026-08-16T23:54:19.629343Z"')
RATE_LIMIT = b'{"Error":"Exceeded msg rate"}'
STATUS = b'{"channel":"status","type":"update","data":[{"version":"2.0.10","system":"%s",' \
         b'"api_version":"v2","connection_id":15113583034416118705}]}'
# The real BTC/USD pair object (PROTOCOL.md 2.6), exponent notation included.
BTC_PAIR = ('{"symbol":"BTC/USD","base":"BTC","quote":"USD","status":"online","qty_precision":8,'
            '"qty_increment":1e-08,"price_precision":1,"cost_precision":5,'
            '"ws_display_price_precision":1,"cost_min":0.5,"tick_size":0.1,'
            '"price_increment":0.1,"qty_min":5e-05}')


class _Line(msgspec.Struct):
    rx_ns: int
    frame: msgspec.Raw  # the frame's bytes exactly as captured
    dir: str | None = None


def recorded() -> list[tuple[int, bytes]]:
    if not VECTOR.is_file():
        pytest.skip(f"vector file missing: {VECTOR}")
    dec = msgspec.json.Decoder(_Line)
    lines = [dec.decode(raw) for raw in VECTOR.read_bytes().splitlines()[1:]]
    return [(ln.rx_ns, bytes(ln.frame)) for ln in lines if ln.dir != "tx"]


def make_config(pairs: list[str], **sections: dict):
    sections.setdefault("data_ingestor", {})
    sections["data_ingestor"].setdefault("book_depth", 25)
    text = f"[trading]\npairs = {json.dumps(pairs)}\n"
    for name, values in sections.items():
        text += f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
    return load_config_text(text)


def book_frame(symbol: str, snapshot: bool) -> bytes:
    kind = "snapshot" if snapshot else "update"
    return (f'{{"channel":"book","type":"{kind}","data":[{{"symbol":"{symbol}","bids":'
            f'[{{"price":100.0,"qty":1.00000000}}],"asks":[{{"price":100.1,"qty":2.00000000}}],'
            f'"checksum":123,"timestamp":"2026-08-16T23:37:04.000000Z"}}]}}').encode()


def ohlc_frame(symbol: str, interval: int, begin: str, close: str,
               kind: str = "update") -> bytes:
    return (f'{{"channel":"ohlc","type":"{kind}","data":[{{"symbol":"{symbol}",'
            f'"open":62000.0,"high":62900.0,"low":61900.0,"close":{close},"trades":3,'
            f'"volume":0.5,"vwap":62400.0,"interval_begin":"2026-08-16T{begin}:00.000000000Z",'
            f'"interval":{interval}}}]}}').encode()


def pair_json(symbol: str, status: str = "online", pp: int = 1, qp: int = 8) -> str:
    if symbol == "BTC/USD" and (status, pp, qp) == ("online", 1, 8):
        return BTC_PAIR
    base, quote = symbol.split("/")
    return (f'{{"symbol":"{symbol}","base":"{base}","quote":"{quote}","status":"{status}",'
            f'"qty_precision":{qp},"qty_increment":1e-0{qp},"price_precision":{pp},'
            f'"price_increment":0.{"0" * (pp - 1)}1}}')


def instrument_frame(pairs: list[str], kind: str = "snapshot") -> bytes:
    return (f'{{"channel":"instrument","type":"{kind}","data":{{"assets":[],"pairs":['
            + ",".join(pairs) + "]}}").encode()


def ack(method: str, req_id: int, result: dict) -> bytes:
    return json.dumps({"method": method, "result": result, "success": True,
                       "time_in": "2026-08-16T23:37:04.849274Z",
                       "time_out": "2026-08-16T23:37:04.849309Z", "req_id": req_id}).encode()


class FakeKraken:
    """Answers requests the way Kraken does (PROTOCOL.md sections 1-2)."""

    def __init__(self, listed: dict[str, tuple[int, int]], *, rate_limit: int | None = None,
                 refuse_depth: int | None = None, no_snapshot: set[str] | None = None) -> None:
        self.listed = listed
        self.rate_limit = rate_limit  # max requests in any 1 s window, like Kraken's limit
        self.refuse_depth = refuse_depth
        self.no_snapshot = no_snapshot if no_snapshot is not None else set()
        self.times: list[int] = []
        self.subscribed: set[tuple] = set()
        self.limited = 0

    def new_connection(self) -> None:
        self.times.clear()
        self.subscribed.clear()

    def respond(self, now: int, req: dict) -> list[tuple[int, bytes]]:
        self.times.append(now)
        if self.rate_limit and sum(1 for t in self.times if t > now - S) > self.rate_limit:
            self.limited += 1
            return [(5 * MS, RATE_LIMIT)]
        rid, method = req["req_id"], req["method"]
        if method == "ping":
            return [(5 * MS, b'{"method":"pong","req_id":%d,"time_in":"x","time_out":"y"}' % rid)]
        p = req["params"]
        ch = p["channel"]
        if method == "subscribe" and ch == "book" and p.get("depth") == self.refuse_depth:
            return [(5 * MS, REFUSAL + b',"req_id":%d}' % rid)]
        if ch == "instrument":
            self.subscribed.add((ch, None, None))
            listing = [pair_json(s, pp=pp, qp=qp) for s, (pp, qp) in self.listed.items()]
            return [(5 * MS, ack(method, rid, {"channel": ch, "snapshot": True})),
                    (60 * MS, instrument_frame(listing))]
        out = []
        for sym in p["symbol"]:
            key = (ch, sym, p.get("interval"))
            result = {"channel": ch, "symbol": sym} | ({"depth": p["depth"]} if "depth" in p else {})
            if method == "unsubscribe":
                if key in self.subscribed:
                    self.subscribed.discard(key)
                    out.append((5 * MS, ack(method, rid, result)))
                else:
                    out.append((5 * MS, b'{"error":"Subscription Not Found","method":"unsubscribe",'
                                b'"success":false,"symbol":"%s","req_id":%d}' % (sym.encode(), rid)))
                continue
            if key in self.subscribed:
                out.append((5 * MS, b'{"error":"Already subscribed","method":"subscribe",'
                            b'"success":false,"symbol":"%s","req_id":%d}' % (sym.encode(), rid)))
                continue
            self.subscribed.add(key)
            out.append((5 * MS, ack(method, rid, result | {"snapshot": p.get("snapshot")})))
            if ch == "book" and sym not in self.no_snapshot:
                out.append((100 * MS, book_frame(sym, True)))
            elif ch == "ohlc":
                out.append((80 * MS, ohlc_frame(sym, p["interval"], "23:35", "62800.0",
                                                "snapshot")))
        return out


class Sim:
    """The I/O shell's role, in simulated time."""

    def __init__(self, pairs: list[str], server: FakeKraken | None = None, seed: int = 7,
                 listed: dict[str, tuple[int, int]] | None = None, **sections: dict) -> None:
        sections.setdefault("data_ingestor", {}).setdefault("ohlc_intervals", [])
        self.s = KrakenSession(make_config(pairs, **sections), random.Random(seed),
                               url="ws://fake/v2")
        if server is None and listed is not False:
            server = FakeKraken(listed or {p: (1, 8) for p in pairs})
        self.server = server
        self.now = T0
        self.wake: int | None = None
        self.queue: list = []
        self._seq = itertools.count()
        self.log: list[tuple[int, object]] = []
        self.connect_plan: list[str] = []  # "ok" or a failure reason, per Connect
        self.conn: int | None = None
        self.conns = 0
        self.forwarded: list[tuple[int, str]] = []

    # -- the shell ---------------------------------------------------------------------
    def apply(self, actions: list) -> None:
        for a in actions:
            self.log.append((self.now, a))
            if isinstance(a, ScheduleWake):
                assert a.at_ns > self.now
                self.wake = a.at_ns
            elif isinstance(a, Send) and self.server is not None and self.conn is not None:
                for delay, frame in self.server.respond(self.now, json.loads(a.text)):
                    self.at(self.now + delay, frame=frame)
            elif isinstance(a, Connect):
                self.at(self.now + 50 * MS, connect=self.connect_plan.pop(0)
                        if self.connect_plan else "ok")
            elif isinstance(a, Close):
                self.conn = None
            elif isinstance(a, ForwardBook):
                self.forwarded.append((self.now, a.symbol))

    def receive(self, frame: bytes) -> None:
        if peek_channel(frame) == "book":
            symbol = peek_symbol(frame)
            if self.s.on_book_frame(symbol, b'"type":"snapshot"' in frame[:40], self.now):
                self.forwarded.append((self.now, symbol))
        else:
            self.apply(self.s.on_frame(frame, self.now))

    def at(self, t: int, **what) -> None:
        what.setdefault("conn", self.conn)
        heapq.heappush(self.queue, (t, next(self._seq), what))

    def _do(self, what: dict) -> None:
        if "connect" in what:
            if what["connect"] == "ok":
                self.conns += 1
                self.conn = self.conns
                if self.server is not None:
                    self.server.new_connection()
                self.apply(self.s.on_connected(self.now, self.conn))
            else:
                self.apply(self.s.on_connect_failed(self.now, what["connect"]))
        elif self.conn is None or what["conn"] not in (self.conn, "any"):
            return  # meant for a connection that is gone
        elif "frame" in what:
            self.receive(what["frame"])
        elif "drop" in what:
            conn, self.conn = self.conn, None
            self.apply(self.s.on_disconnected(self.now, what["drop"], conn))

    def run(self, seconds: float) -> None:
        end = self.now + round(seconds * S)
        while True:
            t_evt = self.queue[0][0] if self.queue else None
            if self.wake is not None and self.wake <= end and (t_evt is None or self.wake <= t_evt):
                self.now, self.wake = max(self.now, self.wake), None
                self.apply(self.s.on_timer(self.now))
            elif t_evt is not None and t_evt <= end:
                self.now = max(self.now, t_evt)
                self._do(heapq.heappop(self.queue)[2])
            else:
                break
        self.now = end

    def every(self, seconds: float, duration: float, frame: bytes) -> None:
        """`frame` every `seconds` for `duration`, on whatever connection is up then."""
        for i in range(int(duration / seconds)):
            self.at(self.now + round((i + 1) * seconds * S), frame=frame, conn="any")

    def start(self, run: float = 2.0) -> Sim:
        self.apply(self.s.start(self.now))
        self.run(run)
        return self

    # -- what happened -----------------------------------------------------------------
    def actions(self, cls: type, since: int = 0) -> list:
        return [a for t, a in self.log if isinstance(a, cls) and t >= since]

    def sent(self, since: int = 0) -> list[dict]:
        return [json.loads(a.text) for a in self.actions(Send, since)]

    def events(self, cls: type = SystemStateEvent, since: int = 0) -> list:
        return [a.event for a in self.actions(Publish, since) if isinstance(a.event, cls)]

    def codes(self, since: int = 0) -> list[tuple[str, str | None]]:
        return [(e.status_code, e.pair) for e in self.events(since=since)]


def book_requests(sent: list[dict]) -> list[tuple[str, list[str]]]:
    return [(r["method"], r["params"]["symbol"]) for r in sent
            if r.get("params", {}).get("channel") == "book"]


# =========================================================================================
def test_instrument_first_then_pair_info_before_any_book_subscription() -> None:
    sim = Sim(["MINA/GBP", "BTC/USD"], listed={"MINA/GBP": (4, 8), "BTC/USD": (1, 8)},
              data_ingestor={"ohlc_intervals": ["1m", "1h"]}).start()
    kinds = [(type(a).__name__, getattr(a, "text", b"")[:60]) for _, a in sim.log]
    sends = sim.sent()
    assert sends[0] == {"method": "subscribe", "params": {"channel": "instrument",
                                                          "snapshot": True}, "req_id": 1}
    assert [r["req_id"] for r in sends] == list(range(1, len(sends) + 1))
    up = next(i for i, (_, a) in enumerate(sim.log) if isinstance(a, ToBookd))
    infos = [i for i, (_, a) in enumerate(sim.log)
             if isinstance(a, ToBookd) and isinstance(a.message, PairInfo)]
    first_book = next(i for i, (_, a) in enumerate(sim.log)
                      if isinstance(a, Send) and b'"channel":"book"' in a.text)
    assert isinstance(sim.log[up][1].message, ConnectionState) and up < infos[0]
    assert max(infos) < first_book, kinds
    assert [sim.log[i][1].message for i in infos] == [
        PairInfo(1, "MINA/GBP", 0, 25, 4, 8, "online", "0.0001", "0.00000001"),
        PairInfo(1, "BTC/USD", 1, 25, 1, 8, "online", "0.1", "0.00000001")]
    assert sim.s.table.settled()
    assert {k.channel for k in sim.s.table.keys()} == {"instrument", "book", "trade", "ohlc"}
    assert all(st in (SubState.ACKED, SubState.LIVE) for st in sim.s.table.states().values())
    assert ("CONNECTED", None) in sim.codes()
    assert [(e.pair, e.status_code) for e in sim.events() if e.pair] == [
        ("MINA/GBP", "online"), ("BTC/USD", "online")]


def test_recorded_minagbp_session_replays_cleanly() -> None:
    frames = recorded()
    sim = Sim(["MINA/GBP"], listed=False).start(run=0.06)
    sim.apply(sim.s.on_frame(frames[0][1], sim.now))  # the real status frame comes first
    [instr] = sim.sent()
    sim.apply(sim.s.on_frame(ack("subscribe", instr["req_id"], {"channel": "instrument"}),
                             sim.now))
    sim.apply(sim.s.on_frame(instrument_frame([pair_json("MINA/GBP", pp=4, qp=8)]), sim.now))
    sim.run(1.0)
    book, trade = sim.sent()[1:]  # the book goes before the trade queued earlier
    assert book == {"method": "subscribe", "req_id": book["req_id"], "params": {
        "channel": "book", "symbol": ["MINA/GBP"], "depth": 25, "snapshot": True}}
    sim.apply(sim.s.on_frame(ack("subscribe", trade["req_id"], {"channel": "trade",
                                                                "symbol": "MINA/GBP"}), sim.now))
    start, t0 = sim.now, frames[1][0]
    for rx, frame in frames[1:]:  # the real ack (no req_id), snapshot, updates, heartbeats
        sim.at(start + rx - t0, frame=frame)
    sim.run((frames[-1][0] - t0) / S)
    c = sim.s.counters
    # 1 snapshot + 29 updates (vectors/SOURCES.md), all forwarded; 60 heartbeats.
    assert (c["book_frames"], c["book_frames_dropped"], c["heartbeats"]) == (30, 0, 60)
    assert (c["acks"], c["decode_errors"], c["stale"]) == (3, 0, 0)
    assert len(sim.forwarded) == 30 and sim.actions(Close) == []
    assert sim.s.table.state(SubKey(BOOK, "MINA/GBP")) is SubState.LIVE
    assert ("online", None) in sim.codes()
    # The capture ends: no more heartbeats. The heartbeat timer notices, not the books.
    end = sim.now
    sim.run(10.5)
    [close] = sim.actions(Close, end)
    assert close.reason.startswith("no heartbeat for 10.")
    assert sim.codes(end)[:2] == [("DISCONNECTED", None), ("RECONNECTING", None)]


def test_refused_depth_without_symbol_names_the_pairs_and_spares_the_rest() -> None:
    server = FakeKraken({"MINA/GBP": (4, 8), "BTC/USD": (1, 8)}, refuse_depth=25)
    sim = Sim(["MINA/GBP", "BTC/USD"], server=server).start()
    sim.every(1.0, 5.0, HEARTBEAT)
    sim.run(5.0)
    errors = [e for e in sim.events() if e.status_code == "ERROR"]
    assert [(e.pair, e.status_message) for e in errors] == [
        (p, f"subscription book {p} at depth 25 refused: Subscription depth not supported")
        for p in ("MINA/GBP", "BTC/USD")]
    assert sim.s.counters["refused"] == 2 and sim.s.counters["critical_errors"] == 2
    assert sim.s.table.state(SubKey("trade", "BTC/USD")) is SubState.ACKED
    assert sim.s.state is SessionState.OPEN and sim.actions(Close) == []
    assert len(book_requests(sim.sent())) == 1  # a refusal is not retried


def test_exceeded_msg_rate_is_retried_paced_until_everything_is_acked() -> None:
    pairs = [f"P{i:02d}/USD" for i in range(30)]
    server = FakeKraken({p: (1, 8) for p in pairs}, rate_limit=3)
    sim = Sim(pairs, server=server, ingest={"requests_per_s": 50.0, "symbols_per_request": 10,
                                            "book_silence_s": 600.0},
              data_ingestor={"ohlc_intervals": ["1m", "5m"]}).start(run=0.0)
    sim.every(1.0, 120.0, HEARTBEAT)
    sim.run(120.0)
    assert server.limited > 0 and sim.s.counters["rate_limited"] == server.limited
    states = sim.s.table.states()
    assert len(states) == 1 + 30 * 4
    assert set(states.values()) <= {SubState.ACKED, SubState.LIVE}
    assert {(k.channel, k.symbol, k.interval) for k in states} == server.subscribed
    assert sim.s.counters["stale"] == 0 and sim.s.counters["refused"] == 0
    # After each rate-limit episode nothing is sent for at least the 1 s base pause.
    limited_at = [t for t, a in sim.log if isinstance(a, Log) and "Exceeded msg rate" in a.message]
    sends_at = [t for t, a in sim.log if isinstance(a, Send)]
    assert limited_at
    for t in limited_at:
        assert not [u for u in sends_at if t < u < t + S]
    assert sim.actions(Close) == []


def test_status_changes_are_published_and_maintenance_slows_reconnects() -> None:
    sim = Sim(["BTC/USD"]).start()
    for system in ("online", "maintenance", "online", "cancel_only"):
        sim.receive(STATUS % system.encode())
    assert [c for c in sim.codes() if c[1] is None and c[0] not in ("CONNECTED",)] == [
        ("online", None), ("maintenance", None), ("online", None), ("cancel_only", None)]
    assert sim.s.engine_state == "cancel_only"
    t = sim.now
    sim.at(t, drop="peer closed")
    sim.run(0.0)
    [wake] = sim.actions(ScheduleWake, t)
    assert wake.at_ns - t >= 5 * S  # Kraken: after maintenance, no faster than every 5 s


def test_quiet_connection_message_timer_reconnects_and_resubscribes() -> None:
    sim = Sim(["BTC/USD"], data_ingestor={"max_heartbeat_interval_s": 30.0}).start()
    last_rx = max(t for t, a in sim.log if isinstance(a, (Send, ToBookd)))
    sim.run(20.0)
    [close] = sim.actions(Close)
    assert close.reason == "no message for 15.0 s (max_message_interval_s 15.0 s)"
    assert sim.s.counters["message_timeouts"] == 1
    t_close = next(t for t, a in sim.log if isinstance(a, Close))
    assert t_close - last_rx < 16 * S
    downs = [a.message for a in sim.actions(ToBookd) if isinstance(a.message, ConnectionState)]
    assert [(m.conn_id, m.up) for m in downs] == [(1, True), (1, False), (2, True)]
    connects = sim.actions(Connect)
    assert [c.attempt for c in connects] == [1, 2]
    assert [t for t, a in sim.log if isinstance(a, Connect)][1] - t_close == S  # base delay
    # The new connection subscribes again from scratch, PairInfo with the new conn_id.
    infos = [a.message for a in sim.actions(ToBookd, t_close) if isinstance(a.message, PairInfo)]
    assert [(i.conn_id, i.pair) for i in infos] == [(2, "BTC/USD")]
    assert sim.s.table.state(SubKey(BOOK, "BTC/USD")) is SubState.LIVE


def test_heartbeat_timer_fires_even_while_books_flow() -> None:
    sim = Sim(["BTC/USD"]).start()
    sim.every(0.5, 30.0, book_frame("BTC/USD", False))
    sim.run(12.0)
    [close] = sim.actions(Close)
    assert close.reason.startswith("no heartbeat for 10.")
    assert sim.s.counters["heartbeat_timeouts"] == 1 and sim.s.counters["message_timeouts"] == 0


def test_missing_snapshot_goes_stale_and_resubscribes_that_pair_alone() -> None:
    server = FakeKraken({"BTC/USD": (1, 8), "ETH/USD": (2, 8)}, no_snapshot={"ETH/USD"})
    sim = Sim(["BTC/USD", "ETH/USD"], server=server).start()
    t = sim.now
    server.no_snapshot.clear()  # the second subscription works
    sim.every(1.0, 20.0, HEARTBEAT)
    sim.run(20.0)
    assert sim.codes(t) == [("STALE", "ETH/USD")]
    stale = [a for a in sim.actions(ToBookd, t) if isinstance(a.message, Stale)]
    assert [(a.message.pair, a.message.reason, a.pair_index) for a in stale] == [
        ("ETH/USD", "no snapshot within 10 s of the ack", 1)]
    assert book_requests(sim.sent(t)) == [("unsubscribe", ["ETH/USD"]), ("subscribe", ["ETH/USD"])]
    assert sim.s.table.state(SubKey(BOOK, "ETH/USD")) is SubState.LIVE
    assert sim.actions(Close) == [] and sim.s.counters["stale"] == 1


def test_silent_book_is_stale_and_resubscribed_while_heartbeats_flow() -> None:
    sim = Sim(["BTC/USD", "ETH/USD"]).start()
    t = sim.now
    sim.every(1.0, 100.0, HEARTBEAT)
    sim.every(2.0, 100.0, book_frame("BTC/USD", False))  # ETH/USD: silence after its snapshot
    sim.run(57.0)  # ETH/USD's snapshot came at about 0.2 s
    assert sim.codes(t) == []
    sim.run(4.0)
    [stale] = sim.events(since=t)
    assert (stale.status_code, stale.pair) == ("STALE", "ETH/USD")
    assert stale.status_message.startswith("book ETH/USD silent for 60.")
    sim.run(38.0)
    assert book_requests(sim.sent(t)) == [("unsubscribe", ["ETH/USD"]), ("subscribe", ["ETH/USD"])]
    assert sim.actions(Close) == [] and sim.s.state is SessionState.OPEN
    assert sim.s.table.state(SubKey(BOOK, "BTC/USD")) is SubState.LIVE


def connect_times(sim: Sim) -> list[int]:
    return [t for t, a in sim.log if isinstance(a, Connect)]


def test_backoff_sequence_then_halt_trigger_and_cooldown() -> None:
    def failing(seed: int) -> Sim:
        sim = Sim(["BTC/USD"], seed=seed, data_ingestor={"max_reconnect_attempts": 4})
        sim.connect_plan = ["refused"] * 100
        return sim.start(run=1000.0)

    sim = failing(11)
    times = connect_times(sim)
    gaps = [b - a - 50 * MS for a, b in itertools.pairwise(times)]  # minus the connect time
    assert gaps[0] == S  # first retry: exactly the base
    assert S <= gaps[1] <= 2 * S and S <= gaps[2] <= 4 * S
    assert gaps[3:] == [300 * S] * 3  # cool-downs, never a tight loop
    assert [c.attempt for c in sim.actions(Connect)] == [1, 2, 3, 4, 5, 6, 7]
    triggers = sim.events(PotentialHaltTriggerEvent)
    assert [(e.error_code, e.source_module) for e in triggers] == [
        ("RECONNECT_BUDGET_EXHAUSTED", "ingest")] * 4  # after failures 4, 5, 6 and 7
    assert triggers[0].reason == "4 consecutive connection failures " \
        "(max_reconnect_attempts 4); last: connect failed: refused"
    assert [c for c in sim.codes() if c[0] == "ERROR"] == [("ERROR", None)] * 4
    assert sim.s.state is SessionState.COOLDOWN
    assert connect_times(failing(11)) == times  # seeded: reproducible
    assert connect_times(failing(12))[2:4] != times[2:4]  # ... and jittered


def test_a_healthy_connection_resets_the_attempts_an_unhealthy_one_does_not() -> None:
    def drop_after(up_s: float) -> Sim:
        sim = Sim(["BTC/USD"])
        sim.connect_plan = ["refused", "refused", "refused", "ok"]
        sim.every(1.0, 100.0, HEARTBEAT)
        sim.start(run=8.0)  # connected after at most 1 + 2 + 4 s of backoff
        assert sim.s.state is SessionState.OPEN
        sim.run(up_s)
        sim.failures_before_drop = sim.s.backoff.failures
        sim.at(sim.now, drop="peer went away")
        sim.run(20.0)
        return sim

    healthy = drop_after(31.0)
    assert healthy.failures_before_drop == 0  # restored while still connected
    assert any(isinstance(a, Log) and a.message.endswith("reconnect budget restored")
               for _, a in healthy.log)
    t_drop = next(t for t, a in healthy.log if isinstance(a, Publish)
                  and a.event.status_code == "DISCONNECTED")
    assert connect_times(healthy)[-1] - t_drop == S
    assert healthy.actions(Connect)[-1].attempt == 2
    assert [e.status_message for e in healthy.events() if e.status_code == "RECONNECTING"][-1] \
        == "reconnect attempt 2 in 1.00 s after: connection lost: peer went away"
    unhealthy = drop_after(1.0)
    assert unhealthy.failures_before_drop == 3
    assert unhealthy.actions(Connect)[-1].attempt == 5
    assert unhealthy.s.backoff.failures == 4


def test_per_pair_resync_touches_no_other_pair() -> None:
    pairs = ["BTC/USD", "ETH/USD", "SOL/USD"]
    sim = Sim(pairs).start()
    sim.every(1.0, 10.0, HEARTBEAT)
    t = sim.now
    forwarded = len(sim.forwarded)
    sim.apply(sim.s.request_resync(["ETH/USD"], sim.now))
    sim.run(2.0)
    assert book_requests(sim.sent(t)) == [("unsubscribe", ["ETH/USD"]), ("subscribe", ["ETH/USD"])]
    assert sim.forwarded[forwarded:] == [(sim.forwarded[-1][0], "ETH/USD")]  # fresh snapshot
    assert all(sim.s.table.state(SubKey(BOOK, p)) is SubState.LIVE for p in pairs)
    assert sim.s.counters["resyncs"] == 1 and sim.codes(t) == []
    t = sim.now  # a request about an older connection, or an unknown pair: nothing
    sim.apply(sim.s.request_resync(["BTC/USD"], sim.now, conn_id=99))
    sim.apply(sim.s.request_resync(["DOGE/USD"], sim.now))
    sim.run(2.0)
    assert sim.sent(t) == [] and sim.s.counters["resyncs_ignored"] == 2


def test_candles_close_when_the_next_interval_begins() -> None:
    sim = Sim(["BTC/USD"], data_ingestor={"ohlc_intervals": ["5m"]}).start()
    # The subscription's snapshot (the running 23:35 candle at 62800.0), then updates.
    for begin, close in (("23:35", "62850.5"), ("23:40", "62860.1"), ("23:40", "62870.0")):
        sim.receive(ohlc_frame("BTC/USD", 5, begin, close))
    assert [(e.timestamp[11:16], e.close, e.closed)
            for e in sim.events(MarketDataOHLCVEvent)] == [
        ("23:35", "62800.0", False), ("23:35", "62850.5", False),
        ("23:35", "62850.5", True), ("23:40", "62860.1", False), ("23:40", "62870.0", False)]
    assert [e.interval for e in sim.events(MarketDataOHLCVEvent)] == ["5m"] * 5
    assert sim.s.table.state(SubKey("ohlc", "BTC/USD", 5)) is SubState.LIVE


def test_hundred_pairs_start_never_exceeds_the_pacing_rate() -> None:
    pairs = [f"C{i:03d}/USD" for i in range(100)]
    server = FakeKraken({p: (1, 8) for p in pairs}, rate_limit=15)  # stricter than Kraken's 20
    sim = Sim(pairs, server=server, data_ingestor={"ohlc_intervals": ["1m", "1h"]}).start(0.0)
    sim.every(1.0, 10.0, HEARTBEAT)
    sim.run(10.0)
    sends = [t for t, a in sim.log if isinstance(a, Send)]
    assert len(sends) == 1 + 4 + 8 + 4  # instrument, trade, 2 x ohlc, book: 25 symbols each
    per_second = [sum(1 for t in sends if (t - T0) // S == k) for k in range(10)]
    assert max(per_second) <= 10, per_second
    assert all(sum(1 for u in sends[i:] if u < t + S) <= 10 for i, t in enumerate(sends))
    assert server.limited == 0 and sim.s.counters["rate_limited"] == 0
    assert sim.s.table.settled() and len(server.subscribed) == 1 + 100 * 4


def test_bad_frames_are_counted_logged_and_trigger_a_halt_at_the_threshold() -> None:
    sim = Sim(["BTC/USD"]).start()
    bad = [b"garbage", b'{"channel":"nope"}', b"", b'{"channel":"trade","type":"update","data":1}',
           b'{"method":"subscribe","success":false}']
    for frame in bad:
        sim.receive(frame)
    assert sim.s.counters["decode_errors"] == 5
    assert sum(1 for _, a in sim.log
               if isinstance(a, Log) and a.message.startswith("undecodable")) == 5
    [trigger] = sim.events(PotentialHaltTriggerEvent)
    assert (trigger.error_code, trigger.pair) == ("CRITICAL_ERROR_THRESHOLD", None)
    assert sim.s.state is SessionState.OPEN


def test_ping_when_nothing_was_sent_for_the_ping_interval() -> None:
    sim = Sim(["BTC/USD"]).start()
    last_send = max(t for t, a in sim.log if isinstance(a, Send))
    sim.every(1.0, 40.0, HEARTBEAT)
    sim.run(40.0)
    pings = [(t, json.loads(a.text)) for t, a in sim.log
             if isinstance(a, Send) and b'"ping"' in a.text]
    assert len(pings) == 1 and pings[0][0] == last_send + 30 * S
    assert pings[0][1] == {"method": "ping", "req_id": pings[0][1]["req_id"]}
    assert sim.s.counters["pings"] == 1 and sim.s.counters["pongs"] == 1


def test_stop_closes_and_then_nothing_more_happens() -> None:
    sim = Sim(["BTC/USD"]).start()
    out = sim.s.stop(sim.now)
    assert [type(a) for a in out] == [Close, ToBookd, Publish, Log]
    assert out[1].message == ConnectionState(1, False, "stopping")
    assert sim.s.stop(sim.now) == [] and sim.s.on_timer(sim.now + 100 * S) == []
    assert sim.s.on_frame(HEARTBEAT, sim.now) == [] and sim.s.counters["ignored_frames"] == 1
    assert isinstance(sim.s.on_connected(sim.now, 5)[0], Close)


def test_late_events_of_an_old_connection_are_ignored() -> None:
    sim = Sim(["BTC/USD"]).start()
    assert sim.s.on_disconnected(sim.now, "old socket", conn_id=99) == []
    assert sim.s.on_connect_failed(sim.now, "late") == []
    sim.run(16.0)  # silence: the session closes connection 1 itself
    assert sim.s.on_disconnected(sim.now, "closed", conn_id=1) == []


def test_instrument_updates_status_and_precision_changes() -> None:
    sim = Sim(["BTC/USD", "ETH/USD"]).start()
    t = sim.now
    sim.receive(instrument_frame([pair_json("BTC/USD", "cancel_only")], "update"))
    assert sim.codes(t) == [("cancel_only", "BTC/USD")]
    [info] = [a.message for a in sim.actions(ToBookd, t)]
    assert (info.pair, info.status) == ("BTC/USD", "cancel_only")
    assert sim.sent(t) == []  # a status change needs no resync
    sim.run(0.5)
    t = sim.now
    sim.receive(instrument_frame([pair_json("ETH/USD", pp=3)], "update"))
    [info] = [a.message for a in sim.actions(ToBookd, t)]
    assert (info.pair, info.price_precision) == ("ETH/USD", 3)
    sim.run(1.0)
    assert book_requests(sim.sent(t)) == [("unsubscribe", ["ETH/USD"]), ("subscribe", ["ETH/USD"])]


def test_a_pair_missing_from_the_instrument_snapshot_gets_no_book() -> None:
    sim = Sim(["BTC/USD", "XBT/USD"], listed={"BTC/USD": (1, 8)}).start()
    [err] = [e for e in sim.events() if e.status_code == "ERROR"]
    assert err.pair == "XBT/USD" and "not in Kraken's instrument snapshot" in err.status_message
    assert book_requests(sim.sent()) == [("subscribe", ["BTC/USD"])]
    assert sim.s.counters["missing_pairs"] == 1
    assert not sim.s.on_book_frame("XBT/USD", True, sim.now)


def test_book_frames_before_pair_info_are_dropped_and_on_frame_forwards_books() -> None:
    sim = Sim(["BTC/USD"])
    sim.apply(sim.s.start(sim.now))
    sim.run(0.051)  # connected; the instrument snapshot has not come yet
    assert sim.s.state is SessionState.OPEN
    assert not sim.s.on_book_frame("BTC/USD", True, sim.now)
    assert sim.s.counters["book_frames_dropped"] == 1
    sim.run(2.0)
    out = sim.s.on_frame(book_frame("BTC/USD", False), sim.now)
    assert out == [ForwardBook(book_frame("BTC/USD", False), "BTC/USD")]


def test_trades_are_published() -> None:
    sim = Sim(["MATIC/USD"]).start()
    sim.receive(b'{"channel":"trade","type":"update","data":[{"symbol":"MATIC/USD","side":"sell",'
                b'"price":0.5117,"qty":40.0,"ord_type":"market","trade_id":4665906,'
                b'"timestamp":"2023-09-25T07:49:37.708706Z"}]}')
    [trade] = [a.event for a in sim.actions(Publish) if type(a.event).__name__ ==
               "MarketDataTradeEvent"]
    assert (trade.pair, trade.price, trade.qty, trade.recv_ns) == ("MATIC/USD", "0.5117", "40.0",
                                                                   sim.now)
    assert sim.s.table.state(SubKey("trade", "MATIC/USD")) is SubState.LIVE


# Requests time out (2 s) before the liveness timers (3 s) close a silent connection.
LIVENESS_2S = {"data_ingestor": {"max_heartbeat_interval_s": 3.0, "max_message_interval_s": 3.0,
                                 "reconnect_delay_s": 0.1, "max_reconnect_delay_s": 0.5},
               "ingest": {"snapshot_timeout_s": 2.0}}


def test_unanswered_requests_on_a_silent_connection_are_not_critical_errors() -> None:
    """Everything stalled: each short connection's requests go unanswered, but that is
    the dead socket (the liveness timers reconnect), not a refused subscription; counting
    them raised a halt trigger after a few reconnects."""
    sim = Sim(["BTC/USD"], listed=False, **LIVENESS_2S).start(run=12.0)
    assert sim.s.counters["heartbeat_timeouts"] + sim.s.counters["message_timeouts"] >= 3
    assert sim.s.counters["ack_timeouts"] >= 1
    assert sim.s.counters["critical_errors"] == 0
    assert not sim.events(PotentialHaltTriggerEvent)


def test_unanswered_requests_while_heartbeats_flow_are_critical_errors() -> None:
    sim = Sim(["BTC/USD"], listed=False, **LIVENESS_2S)
    sim.every(0.5, 12.0, b'{"channel":"heartbeat"}')
    sim.start(run=12.0)
    assert sim.s.counters["heartbeat_timeouts"] == 0 and sim.s.counters["ack_timeouts"] >= 1
    assert sim.s.counters["critical_errors"] >= 1
