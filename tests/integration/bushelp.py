"""What the bus tests share: example events, the bus as a subprocess, a producer,
subscribers and the last-value cache recipe. The `ctx`, `bus` and `own_bus` fixtures
built on them are in conftest.py.

Every bus here has its own namespace (never containing "krakenfeed"), a short temp run
directory and free ports (`harness.make_config`). Subscriptions in ZMQ take effect
asynchronously (the "slow joiner"), so a test that needs a subscriber to see a given
message first publishes warm-up messages until the subscriber receives one (`warm_up`).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import zmq

from bus.schema import (
    HaltDecision,
    HaltTrigger,
    MarketDataL2Event,
    MarketDataOHLCVEvent,
    MarketDataTradeEvent,
    PotentialHaltTriggerEvent,
    StatsEvent,
    SystemStateEvent,
    split_frame,
    topic_for,
)
from ingest.config import Config, load_config
from ingest.messages import pack_event
from tests.integration.harness import LoggedPopen, stop_process, wait_for

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
