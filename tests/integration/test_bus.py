"""The bus process end to end: `python -m bus --config <tmp toml>` as a subprocess, a
producer PUSHing EVENT messages to its `bus.in`, subscribers on its public sockets.

Every bus here has its own namespace (never containing "krakenfeed"), a short temp run
directory and free ports (`harness.make_config`). Waits are bounded by `wait_for` or
poll timeouts; nothing asserts timing. Subscriptions in ZMQ take effect asynchronously
(the "slow joiner"), so a test that needs a subscriber to see a given message first
publishes warm-up messages until the subscriber receives one.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from bus import schema
from bus.schema import (
    HaltDecision,
    HaltTrigger,
    MarketDataL2Event,
    MarketDataOHLCVEvent,
    MarketDataTradeEvent,
    PotentialHaltTriggerEvent,
    StatsEvent,
    SystemStateEvent,
    decode_envelope_json,
    decode_envelope_msgpack,
    l2_to_ticks,
    split_frame,
    subscription_prefix,
    topic_for,
)
from ingest.config import Config, load_config
from ingest.messages import HEADER_SIZE, pack_event
from tests.integration.harness import (
    ROOT,
    LoggedPopen,
    _env,
    make_config,
    stop_process,
    wait_for,
)

_enc = msgspec.json.Encoder()
TIMEOUT = 10.0  # bound of every wait; never reached when things work


# ------------------------------------------------------------------------------------
# events a producer would publish

def book(pair: str, i: int, depth: int = 10) -> MarketDataL2Event:
    """A realistic depth-`depth` book whose best bid/ask encode `i` (unique per i)."""
    base = 45_000 + i
    bids = [(f"{base - k}.{(i + k) % 10}", f"{(k + 1) * 0.137 + i % 7:.8f}")
            for k in range(depth)]
    asks = [(f"{base + 1 + k}.{(i + k) % 10}", f"{(k + 2) * 0.211 + i % 5:.8f}")
            for k in range(depth)]
    return MarketDataL2Event(
        pair=pair, timestamp="2026-08-16T23:37:03.745044Z", bids=bids, asks=asks,
        checksum=(i * 2654435761) % 2**32, conn_id=1, exchange_ts_ns=1786923423745044000,
        recv_ns=1786923423746000000 + i, snapshot=i == 0, depth=depth, price_precision=1,
        qty_precision=8)


def trade(pair: str, i: int) -> MarketDataTradeEvent:
    return MarketDataTradeEvent(
        pair=pair, trade_id=i, side="buy" if i % 2 else "sell", price=f"{45_000 + i}.5",
        qty="0.00005100", ord_type="limit", timestamp="2026-08-16T23:37:03.745044Z",
        recv_ns=1786923423746000000 + i)


def candle(pair: str, i: int) -> MarketDataOHLCVEvent:
    return MarketDataOHLCVEvent(
        pair=pair, interval="1m", timestamp="2026-08-16T23:37:00.000000000Z",
        open="45000.0", high=f"{45_000 + i}.0", low="44999.9", close=f"{45_000 + i}.0",
        volume="1.25000000", vwap="45000.2", count=i, closed=False, recv_ns=1 + i)


def system(i: int) -> SystemStateEvent:
    return SystemStateEvent(timestamp="2026-08-16T23:37:03.000000000Z", service_name="test",
                            status_code="CONNECTED", status_message=f"warm-up {i}")


# Every event type, with values a float would get wrong in the book.
EXACT_BOOK = MarketDataL2Event(
    pair="MEME/USD", timestamp=None,
    bids=[("1234567890.12345678", "184467440737.09551615"), ("0.00000001", "0.00005100")],
    asks=[("1234567890.12345679", "99999999999.99999999")],
    checksum=3310070434, conn_id=2**64 - 1, exchange_ts_ns=None, recv_ns=1, snapshot=True,
    depth=10, price_precision=8, qty_precision=8)
EVERY_EVENT: list[Any] = [
    book("BTC/USD", 3), EXACT_BOOK, trade("BTC/USD", 4665906), candle("ETH/USD", 12),
    SystemStateEvent(timestamp="2026-08-16T23:37:03.402652000Z", service_name="test",
                     status_code="online", status_message='engine "online" \\o/ €',
                     pair=None),
    PotentialHaltTriggerEvent(
        timestamp="2026-08-16T23:40:00.000000000Z", source_module="test",
        error_code="CHECKSUM_MISMATCHES", reason="5 checksum mismatches in 60 s",
        details="last: local 1234 != exchange 4249465476", pair="BTC/USD"),
    StatsEvent(timestamp="2026-08-16T23:37:10.000000000Z", process="test", pid=4242,
               counters={"frames": 1830, "drops": 0}, gauges={"lag_ms": 0.4}),
    HaltDecision(timestamp="2026-08-16T23:40:00.500000000Z", reason="test halt",
                 triggers=[HaltTrigger(source="test", error_code="X", reason="r",
                                       pair=None, at="2026-08-16T23:40:00.000000000Z")],
                 stopped=["ingest", "bookd", "bus"]),
]


# ------------------------------------------------------------------------------------
# processes and sockets

class BusProcess:
    """`python -m bus --config CFG`, ready once it logged its epoch (sockets bound)."""

    def __init__(self, cfg_path: Path) -> None:
        self.cfg_path = cfg_path
        self.cfg: Config = load_config(cfg_path)
        self.proc = LoggedPopen([sys.executable, "-m", "bus", "--config", str(cfg_path)],
                                ready_text="bus: epoch ")
        if not self.proc.ready.wait(TIMEOUT) or self.proc.ready_line is None:
            stop_process(self.proc)
            raise RuntimeError(f"the bus did not start:\n{self.proc.log()}")
        m = re.search(r"bus: epoch (\d+)", self.proc.ready_line)
        assert m, self.proc.ready_line
        self.epoch = int(m.group(1))

    def endpoint(self, key: str) -> str:
        return f"tcp://127.0.0.1:{self.cfg.port('bus', key)}"

    json_ep = property(lambda self: self.endpoint("json_port"))
    msgpack_ep = property(lambda self: self.endpoint("msgpack_port"))
    cache_ep = property(lambda self: self.endpoint("cache_port"))

    def stop(self) -> int:
        return stop_process(self.proc)


class Producer:
    """What ingest and bookd are to the bus: a PUSH to `bus.in`, EVENT messages."""

    def __init__(self, ctx: zmq.Context, cfg: Config) -> None:
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 1_000_000)
        self.sock.connect(cfg.ipc("bus.in"))
        self.counts: dict[str, int] = {}

    def send(self, event: Any) -> int:
        """Publish one event; returns how many this producer sent on its topic."""
        topic = topic_for(event)
        self.sock.send(pack_event(topic, type(event).__name__, _enc.encode(event)))
        self.counts[topic] = self.counts.get(topic, 0) + 1
        return self.counts[topic]

    def close(self) -> None:
        self.sock.close(0)


class Msg:
    """One received bus message: topic, the raw payload and the envelope as a dict."""

    __slots__ = ("topic", "payload", "env")

    def __init__(self, frame: bytes) -> None:
        self.topic, self.payload = split_frame(frame)
        self.env = json.loads(self.payload)
        assert self.env["topic"] == self.topic

    seq = property(lambda self: self.env["seq"])
    epoch = property(lambda self: self.env["epoch"])


def subscriber(ctx: zmq.Context, endpoint: str, *prefixes: bytes, rcvhwm: int | None = None,
               rcvbuf: int | None = None) -> zmq.Socket:
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    if rcvhwm is not None:
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
    if rcvbuf is not None:
        sock.setsockopt(zmq.RCVBUF, rcvbuf)
    for p in prefixes:
        sock.setsockopt(zmq.SUBSCRIBE, p)
    sock.connect(endpoint)
    return sock


def drain(sock: zmq.Socket, wait_ms: int = 0) -> list[bytes]:
    """Everything queued on `sock` (waiting up to `wait_ms` for the first frame)."""
    out: list[bytes] = []
    if wait_ms and not sock.poll(wait_ms):
        return out
    while True:
        try:
            out.append(sock.recv(zmq.NOBLOCK))
        except zmq.Again:
            return out


def warm_up(producer: Producer, subs: list[zmq.Socket], make: Callable[[int], Any],
            accept: Callable[[bytes], bool] = lambda f: True) -> list[list[bytes]]:
    """Publish `make(i)` until every subscriber has received an accepted frame (its
    subscription is in effect). Returns what each received meanwhile."""
    got: list[list[bytes]] = [[] for _ in subs]
    i = 0

    def done() -> bool:
        nonlocal i
        i += 1
        producer.send(make(i))
        for k, s in enumerate(subs):
            got[k] += drain(s, 10)
        return all(any(accept(f) for f in g) for g in got)

    wait_for(done, TIMEOUT, "subscriptions to take effect", interval=0.01)
    return got


def ask_cache(ctx: zmq.Context, endpoint: str, prefix: bytes) -> dict:
    """The last-value cache recipe: one REQ frame with a topic prefix, one JSON reply."""
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(endpoint)
    try:
        req.send(prefix)
        assert req.poll(int(TIMEOUT * 1000)), f"no cache reply from {endpoint}"
        return json.loads(req.recv())
    finally:
        req.close(0)


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def _start(tmp: Path, **bus: Any) -> BusProcess:
    return BusProcess(make_config(tmp, ["BTC/USD", "BTC/USDT", "ETH/USD"],
                                  bus={"stats_interval_s": 0.2, **bus}))


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BusProcess]:
    """One bus shared by the tests that do not restart it or shrink its queues."""
    b = _start(tmp_path_factory.mktemp("bus"))
    try:
        yield b
    finally:
        rc = b.stop()
        shutil.rmtree(b.cfg.run_path, ignore_errors=True)
        assert rc == 0, f"bus exited {rc}:\n{b.proc.log()}"


@pytest.fixture
def own_bus(tmp_path: Path) -> Iterator[Callable[..., BusProcess]]:
    """Start a bus of this test's own (with `[bus]` overrides); stopped at the end."""
    started: list[BusProcess] = []

    def start(**bus_overrides: Any) -> BusProcess:
        b = _start(tmp_path, **bus_overrides)
        started.append(b)
        return b

    yield start
    for b in started:
        stop_process(b.proc)
        shutil.rmtree(b.cfg.run_path, ignore_errors=True)


# ------------------------------------------------------------------------------------
# topics

def test_topic_isolation_btc_usd_never_gets_btc_usdt(bus: BusProcess, ctx: zmq.Context):
    exact = subscriber(ctx, bus.json_ep, subscription_prefix("book.BTC/USD"))
    every_book = subscriber(ctx, bus.json_ep, b"book.")
    producer = Producer(ctx, bus.cfg)
    try:
        warm_up(producer, [exact, every_book], lambda i: book("BTC/USD", i))
        for i in range(200):
            producer.send(book("BTC/USDT", i))
            producer.send(book("BTC/USD", 1000 + i))
        producer.send(system(0))  # not a book: neither subscriber gets it
        got_exact: list[Msg] = []
        got_all: list[Msg] = []
        wait_for(lambda: (got_exact.extend(map(Msg, drain(exact, 10))),
                          got_all.extend(map(Msg, drain(every_book, 10))),
                          sum(m.topic == "book.BTC/USDT" for m in got_all) == 200
                          and got_exact and got_exact[-1].env["event"]["bids"][0][0]
                          == book("BTC/USD", 1199).bids[0][0])[-1],
                 TIMEOUT, "both subscribers to receive the burst")
        assert {m.topic for m in got_exact} == {"book.BTC/USD"}
        assert {m.topic for m in got_all} == {"book.BTC/USD", "book.BTC/USDT"}
        assert all(m.env["event"]["pair"] == "BTC/USD" for m in got_exact)
        # The BTC/USDT messages really went out, on their own seq.
        usdt = [m.seq for m in got_all if m.topic == "book.BTC/USDT"]
        assert usdt == list(range(usdt[0], usdt[0] + 200))
    finally:
        producer.close()


# ------------------------------------------------------------------------------------
# back-pressure

def test_stopped_subscriber_does_not_delay_another_and_sees_a_seq_jump(
        own_bus: Callable[..., BusProcess], ctx: zmq.Context):
    # sndhwm bounds each subscriber's queue in the bus. It is kept well above one batch
    # below: libzmq learns how far a subscriber has read only every sndhwm/2 messages,
    # so a queue barely larger than a burst drops even for a subscriber that keeps up.
    b = own_bus(sndhwm=1000)
    prefix = subscription_prefix("book.BTC/USD")
    # The stopped one: tiny queues on its side, and it will not read for a while.
    stopped = subscriber(ctx, b.json_ep, prefix, rcvhwm=5, rcvbuf=4096)
    live = subscriber(ctx, b.json_ep, prefix)
    producer = Producer(ctx, b.cfg)
    try:
        got_stopped, got_live = warm_up(producer, [stopped, live],
                                        lambda i: book("BTC/USD", i))
        first = Msg(got_live[0]).seq
        live_seqs = [Msg(f).seq for f in got_live]
        stopped_seqs = [Msg(f).seq for f in got_stopped]

        def live_reached(target: int) -> bool:
            while live_seqs[-1] < target and live.poll(100):
                live_seqs.extend(Msg(f).seq for f in drain(live))
            return live_seqs[-1] >= target

        # ~1 kB books, 6000 of them (about 6 MB), beyond what the stopped subscriber's
        # queues hold (sndhwm messages in the bus, socket buffers). Sent in batches of 10, each only after the live subscriber has
        # received the last one: were the bus held up by the stopped subscriber, the
        # live one would never get there.
        for _ in range(600):
            for _ in range(10):
                last = producer.send(book("BTC/USD", len(live_seqs)))
            wait_for(lambda target=last: live_reached(target), TIMEOUT,
                     f"the live subscriber to reach seq {last}")
        assert live_seqs == list(range(first, last + 1)), "the live subscriber lost messages"

        # The stopped subscriber resumes: what it had queued, then a seq jump.
        msgs: list[Msg] = []

        def resumed_caught_up() -> bool:
            while stopped.poll(50):
                msgs.extend(map(Msg, drain(stopped)))
            if msgs and msgs[-1].seq > last:
                return True
            producer.send(book("BTC/USD", 0))  # fresh ones: its queue has room again
            return False

        wait_for(resumed_caught_up, TIMEOUT, "the resumed subscriber to get fresh messages")
        stopped_seqs += [m.seq for m in msgs]
        assert {m.epoch for m in msgs} == {b.epoch}
        assert stopped_seqs == sorted(set(stopped_seqs)), "no duplicate, never backwards"
        jumps = [(a, c) for a, c in zip(stopped_seqs, stopped_seqs[1:], strict=False)
                 if c != a + 1]
        assert jumps, "the stopped subscriber lost nothing: the test did not overflow it"
        lost = sum(c - a - 1 for a, c in jumps)
        assert len(stopped_seqs) + lost == stopped_seqs[-1] - stopped_seqs[0] + 1
        # What it held is its queues' worth: sndhwm in the bus plus socket buffers
        # (Linux grows a loopback TCP send buffer to a few MB); the rest was dropped.
        assert lost >= 1 and len(stopped_seqs) < last - first
    finally:
        producer.close()


# ------------------------------------------------------------------------------------
# late join: the last-value cache, then the live stream

def test_late_join_cache_then_live_without_gap_or_duplicate(bus: BusProcess,
                                                            ctx: zmq.Context):
    producer = Producer(ctx, bus.cfg)
    stop = threading.Event()
    makers = [lambda i: book("BTC/USD", i), lambda i: book("ETH/USD", i),
              lambda i: trade("BTC/USD", i), lambda i: candle("BTC/USD", i)]

    def publish() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            for make in makers:
                producer.send(make(i))
            if i % 20 == 0:
                stop.wait(0.001)

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(ask_cache(ctx, bus.cache_ep, b"book.ETH/USD")["messages"]),
                 TIMEOUT, "the publisher to be running")
        # 1. Subscribe first, and wait until the subscription is in effect (a first live
        #    message arrived): from here on the bus delivers every message to us.
        late = subscriber(ctx, bus.json_ep, b"book.", b"trade.", b"ohlc.")
        live: list[Msg] = []
        wait_for(lambda: live.extend(map(Msg, drain(late, 10))) or live, TIMEOUT,
                 "a first live message")
        # 2. Ask the cache (one frame with a prefix; empty = every topic).
        reply = ask_cache(ctx, bus.cache_ep, b"")
        # 3. Keep reading live messages while the publisher goes on.
        wait_for(lambda: (live.extend(map(Msg, drain(late, 10))),
                          len(live) > 2000)[-1], TIMEOUT, "more live messages")
    finally:
        stop.set()
        thread.join(5)
        producer.close()

    assert reply["epoch"] == bus.epoch
    cached = {m["topic"]: m for m in reply["messages"]}
    assert {"book.BTC/USD", "book.ETH/USD", "trade.BTC/USD", "ohlc.1m.BTC/USD",
            "system"} <= set(cached)
    for m in reply["messages"]:  # cache entries are full envelopes of this epoch
        env, _ = decode_envelope_json(json.dumps(m).encode())
        assert env.epoch == bus.epoch and env.topic == m["topic"]
    # 4. Stitch: per topic, drop live messages with seq <= the cached seq (same epoch).
    dropped = 0
    for topic in ("book.BTC/USD", "book.ETH/USD", "trade.BTC/USD", "ohlc.1m.BTC/USD"):
        seqs = [m.seq for m in live if m.topic == topic]
        assert all(m.epoch == bus.epoch for m in live)
        c = cached[topic]["seq"]
        newer = [s for s in seqs if s > c]
        dropped += len(seqs) - len(newer)
        assert newer, f"no live message after the cache on {topic}"
        assert newer[0] == c + 1, f"{topic}: gap between cache seq {c} and live {newer[0]}"
        assert newer == list(range(c + 1, c + 1 + len(newer))), f"{topic}: gap or duplicate"
        # The live messages we drop are exactly those the cache already covered.
        assert seqs[:len(seqs) - len(newer)] == list(range(seqs[0], c + 1))
    assert dropped >= 1  # the first live message preceded the cache reply


# ------------------------------------------------------------------------------------
# restart

def test_bus_restart_changes_the_epoch_and_seq_restarts(own_bus: Callable[..., BusProcess],
                                                        ctx: zmq.Context):
    first = own_bus()
    sub = subscriber(ctx, first.json_ep, subscription_prefix("trade.BTC/USD"),
                     subscription_prefix("system"))
    producer = Producer(ctx, first.cfg)
    try:
        got = warm_up(producer, [sub], lambda i: trade("BTC/USD", i),
                      accept=lambda f: f.startswith(b"trade."))[0]
        for _ in range(5):
            producer.send(trade("BTC/USD", 0))
        before = [Msg(f) for f in got]
        wait_for(lambda: before.extend(map(Msg, drain(sub, 10))) or before[-1].seq
                 == producer.counts["trade.BTC/USD"], TIMEOUT, "the trades before")
        assert {m.epoch for m in before} == {first.epoch}
        assert first.stop() == 0

        # Same config, so the same ports and ipc paths: subscriber and producer
        # reconnect by themselves.
        restarted = BusProcess(first.cfg_path)
        try:
            assert restarted.epoch != first.epoch
            # Our subscriber is back once a system message of the new epoch arrives.
            warm_up(producer, [sub], system,
                    accept=lambda f: Msg(f).epoch == restarted.epoch)
            for i in range(1, 6):
                producer.send(trade("BTC/USD", 10_000 + i))
            after: list[Msg] = []
            wait_for(lambda: after.extend(m for m in map(Msg, drain(sub, 10))
                                          if m.topic == "trade.BTC/USD") or len(after) >= 5,
                     TIMEOUT, "the trades after the restart")
            # A new epoch, and seq counts from 1 again: a subscriber comparing (epoch,
            # seq) sees a restart, not a loss of 1 - last.
            assert [(m.epoch, m.seq, m.env["event"]["trade_id"]) for m in after] == [
                (restarted.epoch, i, 10_000 + i) for i in range(1, 6)]
            assert before[-1].epoch != after[0].epoch and before[-1].seq > after[0].seq
            # The cache knows only the new epoch; the bus's own start event is system 1.
            reply = ask_cache(ctx, restarted.cache_ep, b"")
            assert reply["epoch"] == restarted.epoch
            assert {m["epoch"] for m in reply["messages"]} == {restarted.epoch}
            topics = {m["topic"]: m for m in reply["messages"]}
            assert topics["trade.BTC/USD"]["seq"] == 5
            start_event = ask_cache(ctx, restarted.cache_ep, b"system")["messages"]
            assert start_event[0]["seq"] > 1  # our warm-up messages followed it
            assert restarted.proc.grep(f"epoch {restarted.epoch}")
        finally:
            assert restarted.stop() == 0
    finally:
        producer.close()


def test_bus_announces_its_epoch_on_system(own_bus: Callable[..., BusProcess],
                                           ctx: zmq.Context):
    b = own_bus()
    reply = ask_cache(ctx, b.cache_ep, b"system")
    [start] = reply["messages"]
    assert (start["seq"], start["epoch"]) == (1, b.epoch)
    _, event = decode_envelope_json(json.dumps(start).encode())
    assert isinstance(event, SystemStateEvent)
    assert (event.service_name, event.status_code) == ("bus", "CONNECTED")
    assert str(b.epoch) in event.status_message


# ------------------------------------------------------------------------------------
# every event type, both encodings, and the generated JSON Schema

def test_every_event_round_trips_in_json_and_msgpack(bus: BusProcess, ctx: zmq.Context):
    jsonschema = pytest.importorskip("jsonschema")
    doc = schema.json_schema_document()
    # Each test subscribes to what it publishes; "system" is shared with the bus's own
    # start event, "stats" with its StatsEvent: ours say "test".
    prefixes = [b"book.BTC/USD ", b"book.MEME/USD ", b"trade.", b"ohlc.", b"system ",
                b"trigger ", b"stats ", b"halt "]
    js = subscriber(ctx, bus.json_ep, *prefixes)
    mp = subscriber(ctx, bus.msgpack_ep, *prefixes)
    producer = Producer(ctx, bus.cfg)
    try:
        warm_up(producer, [js, mp], system)
        for event in EVERY_EVENT:
            producer.send(event)
        producer.send(system(-1))  # the end marker
        json_frames: list[bytes] = []
        mp_frames: list[bytes] = []

        def ended(frames: list[bytes], sock: zmq.Socket) -> bool:
            frames += drain(sock, 10)
            return any(b"warm-up -1" in f for f in frames)

        wait_for(lambda: ended(json_frames, js) & ended(mp_frames, mp), TIMEOUT,
                 "every event on both sockets")
    finally:
        producer.close()

    def ours(event: Any) -> bool:
        return not (isinstance(event, StatsEvent | SystemStateEvent)
                    and (getattr(event, "process", None) == "bus"
                         or getattr(event, "service_name", None) == "bus"
                         or getattr(event, "status_message", "").startswith("warm-up")))

    json_got = []
    for f in json_frames:
        topic, payload = split_frame(f)
        env, event = decode_envelope_json(payload)
        raw = json.loads(payload)
        jsonschema.Draft202012Validator(doc["envelope"]).validate(raw)
        jsonschema.Draft202012Validator(doc["events"][raw["type"]]).validate(raw["event"])
        assert env.topic == topic and env.epoch == bus.epoch
        if ours(event):
            json_got.append((env, event))
    mp_got = []
    for f in mp_frames:
        topic, payload = split_frame(f)
        env, event = decode_envelope_msgpack(payload)
        assert env.topic == topic and env.epoch == bus.epoch
        if ours(event):
            mp_got.append((env, event))

    assert [e for _, e in json_got] == EVERY_EVENT
    expected_mp = [l2_to_ticks(e) if isinstance(e, MarketDataL2Event) else e
                   for e in EVERY_EVENT]
    assert [e for _, e in mp_got] == expected_mp
    for (jenv, jev), (menv, mev) in zip(json_got, mp_got, strict=True):
        assert (jenv.topic, jenv.seq, jenv.pub_ns) == (menv.topic, menv.seq, menv.pub_ns)
        assert menv.type == type(mev).__name__
        assert jenv.type == type(jev).__name__
    ticks = mp_got[1][1]
    assert ticks.bids == [(123456789012345678, 18446744073709551615), (1, 5100)]
    assert ticks.asks == [(123456789012345679, 9999999999999999999)]


def test_bus_stats_event_on_topic_stats(bus: BusProcess, ctx: zmq.Context):
    sub = subscriber(ctx, bus.json_ep, subscription_prefix("stats"))
    found: list[Msg] = []
    wait_for(lambda: found.extend(m for m in map(Msg, drain(sub, 50))
                                  if m.env["event"].get("process") == "bus") or found,
             TIMEOUT, "the bus's StatsEvent")
    m = found[0]
    assert m.topic == "stats" and m.env["type"] == "StatsEvent" and m.epoch == bus.epoch
    _, event = decode_envelope_json(m.payload)
    assert isinstance(event, StatsEvent) and event.pid == bus.proc.pid
    assert {"received", "published", "bad_messages", "msgpack_errors",
            "cache_requests"} <= set(event.counters)
    assert event.counters["published"] >= 1  # at least its own start event
    assert "topics" in event.gauges


def test_bad_producer_messages_are_counted_not_fatal(bus: BusProcess, ctx: zmq.Context):
    sub = subscriber(ctx, bus.json_ep, subscription_prefix("stats"),
                     subscription_prefix("trade.BAD/USD"))
    producer = Producer(ctx, bus.cfg)
    try:
        warm_up(producer, [sub], lambda i: trade("BAD/USD", i),
                accept=lambda f: f.startswith(b"trade."))
        seen: list[Msg] = []

        def bad_count() -> int:
            seen.extend(map(Msg, drain(sub, 50)))
            stats = [m for m in seen if m.topic == "stats"
                     and m.env["event"]["process"] == "bus"]
            return stats[-1].env["event"]["counters"]["bad_messages"] if stats else -1

        before = wait_for(lambda: bad_count() + 1, TIMEOUT, "a stats event") - 1
        header = pack_event("x", "y", b"")[:HEADER_SIZE]
        wrong_version = bytearray(pack_event("trade.BAD/USD", "T", b"{}"))
        wrong_version[1] += 1
        for bad in (b"garbage",  # shorter than a header
                    header + b"no-spaces-at-all",  # no topic SP type SP json
                    header + b'bad"topic SystemStateEvent {}',  # refused topic
                    bytes(wrong_version)):
            producer.sock.send(bad)
        last = producer.send(trade("BAD/USD", 999_999))
        wait_for(lambda: bad_count() >= before + 4, TIMEOUT, "the bad messages counted")
        # Still publishing, and the good message after them got the next seq.
        trades = [m for m in seen if m.topic == "trade.BAD/USD"]
        assert trades[-1].env["event"]["trade_id"] == 999_999 and trades[-1].seq == last
        assert bus.proc.poll() is None
    finally:
        producer.close()


# ------------------------------------------------------------------------------------
# python -m bus.tail

def _tail(cfg: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bus.tail", "--config", str(cfg), *args],
                          cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


class _Background:
    """A thread publishing `make(i)` for i = 1, 2, ... until closed."""

    def __init__(self, producer: Producer, *makers: Callable[[int], Any],
                 pause: float = 0.002) -> None:
        self.stop = threading.Event()
        self.producer = producer

        def run() -> None:
            i = 0
            while not self.stop.wait(pause):
                i += 1
                for make in makers:
                    producer.send(make(i))

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.producer.close()


def test_tail_prints_json_envelopes_and_exits_0(bus: BusProcess, ctx: zmq.Context):
    bg = _Background(Producer(ctx, bus.cfg), lambda i: trade("ETH/USD", i))
    try:
        out = _tail(bus.cfg_path, "--count", "3", "--json")
    finally:
        bg.close()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3
    for line in lines:
        env, _ = decode_envelope_json(line.encode())
        assert env.epoch == bus.epoch


def test_tail_topic_prints_only_that_pair(bus: BusProcess, ctx: zmq.Context):
    bg = _Background(Producer(ctx, bus.cfg), lambda i: book("BTC/USDT", i),
                     lambda i: book("BTC/USD", i))
    try:
        wait_for(lambda: len(ask_cache(ctx, bus.cache_ep, b"book.BTC/USDT")["messages"]),
                 TIMEOUT, "a BTC/USDT book in the cache")
        out = _tail(bus.cfg_path, "--topic", "book.BTC/USD", "--count", "5", "--json")
        readable = _tail(bus.cfg_path, "--topic", "book.BTC/USD", "--count", "2")
    finally:
        bg.close()
    assert out.returncode == 0, out.stderr
    envs = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(envs) == 5
    assert {e["topic"] for e in envs} == {"book.BTC/USD"}
    assert {e["event"]["pair"] for e in envs} == {"BTC/USD"}
    # The cached one first, then live ones: stitched without gap or duplicate.
    seqs = [e["seq"] for e in envs]
    assert seqs == list(range(seqs[0], seqs[0] + 5))
    assert readable.returncode == 0, readable.stderr
    lines = readable.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("BTC/USD  bid ") for line in lines)


def test_tail_stitches_cache_and_live_without_gap_on_a_busy_topic(bus: BusProcess,
                                                                   ctx: zmq.Context):
    # Asked before its subscription is in effect, the cache misses what the bus
    # publishes in between: on a busy topic that shows as a seq gap after the first line.
    bg = _Background(Producer(ctx, bus.cfg), lambda i: book("SOL/USD", i), pause=0.0002)
    try:
        runs = [_tail(bus.cfg_path, "--topic", "book.SOL/USD", "--count", "30", "--json")
                for _ in range(3)]
    finally:
        bg.close()
    for out in runs:
        assert out.returncode == 0, out.stderr
        seqs = [json.loads(line)["seq"] for line in out.stdout.splitlines()]
        assert seqs == list(range(seqs[0], seqs[0] + 30)), seqs[:5]


def test_tail_without_a_bus_exits_1_with_a_clear_message(tmp_path: Path):
    cfg = make_config(tmp_path, ["BTC/USD"])
    try:
        out = _tail(cfg, "--count", "3", "--json", "--timeout", "1", timeout=20)
    finally:
        shutil.rmtree(load_config(cfg).run_path, ignore_errors=True)
    assert out.returncode == 1
    assert out.stdout == ""
    port = load_config(cfg).port("bus", "cache_port")
    assert "no bus answered" in out.stderr and str(port) in out.stderr
    assert "Traceback" not in out.stderr
