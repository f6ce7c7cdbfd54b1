"""The bus process: one public PUB for any language, a last-value cache, counters.

Inputs: a PULL socket bound at `<run dir>/<ns>.bus.in` where ingest and bookd PUSH
EVENT messages (`ingest.messages.pack_event`: topic, type, event JSON). The bus never
re-encodes a JSON event: it splices it into the envelope (DESIGN.md section 3)

    <topic> {"v":1,"topic":"<topic>","epoch":E,"seq":N,"pub_ns":T,"type":"<type>","event":<json>}

and publishes that single frame on the JSON PUB socket, bound on
`tcp://<bind_host>:<json_port>` and `ipc://<run dir>/<ns>.bus.json`. `seq` counts per
topic from 1; `epoch` is the bus's start time in unix ns, so it changes on every
restart and a subscriber detects loss as a `seq` jump within one epoch.

msgpack: the same envelopes, books as ticks plus precision, on an XPUB socket
(`msgpack_port`, `<ns>.bus.msgpack`). XPUB tells the bus whether anyone subscribes, so
the conversion costs nothing until someone does.

Last-value cache: a ROUTER on `cache_port` / `<ns>.bus.cache`. A request is one frame
holding a topic prefix (UTF-8; empty = everything), from a REQ socket (or DEALER with
an empty delimiter frame). The reply is one frame of JSON:
`{"epoch": E, "messages": [<envelope>, ...]}` with the latest envelope of every topic
that starts with the prefix. Late-join recipe (docs/events.md): subscribe first, then
ask the cache, then drop live messages whose seq is <= the cached seq of their topic.

Back-pressure: PUB sockets drop for a subscriber whose queue (`sndhwm`) is full and
never block the bus or other subscribers; that subscriber sees a `seq` jump. The
bus's own counters (received, published, bad messages, msgpack conversion errors) go
out as a StatsEvent on topic `stats` every `stats_interval_s`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import msgspec
import zmq

from bus import schema
from ingest.config import Config
from ingest.messages import (
    EVENT,
    MessageError,
    batch_hwm,
    unpack_inner,
)

log = logging.getLogger("bus")
DRAIN = 5000
_json = msgspec.json.Encoder()


class _Topic:
    __slots__ = ("seq", "head", "last")

    @staticmethod
    def new(topic: bytes) -> _Topic:
        """A topic's state; ValueError for a topic that cannot be one: empty, or with a
        space, a quote, a backslash (spliced into JSON as is) or bytes that are not
        UTF-8."""
        if not topic or b" " in topic or b'"' in topic or b"\\" in topic:
            raise ValueError(f"bad topic {topic[:60]!r}")
        try:
            return _Topic(topic)
        except UnicodeDecodeError:
            raise ValueError(f"topic {topic[:60]!r} is not UTF-8") from None

    def __init__(self, topic: bytes) -> None:
        self.seq = 0
        # b'<topic> {"v":1,"topic":"<topic>","epoch":'
        self.head = topic + b' {"v":%d,"topic":' % schema.SCHEMA_VERSION + \
            _json.encode(topic.decode()) + b',"epoch":'
        self.last: bytes | None = None


class BusCore:
    """Envelope stamping and the last-value cache, without sockets."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.epoch_b = b"%d" % epoch
        self.topics: dict[bytes, _Topic] = {}
        self.counters = {"received": 0, "published": 0, "bad_messages": 0,
                         "msgpack_errors": 0, "cache_requests": 0}

    def stamp(self, topic: bytes, type_name: bytes, event_json: bytes, pub_ns: int) -> bytes:
        t = self.topics.get(topic)
        if t is None:
            t = self.topics[topic] = _Topic.new(topic)
        t.seq += 1
        msg = b"".join((t.head, self.epoch_b, b',"seq":%d,"pub_ns":%d,"type":"' % (t.seq, pub_ns),
                        type_name, b'","event":', event_json, b"}"))
        t.last = msg
        return msg

    def stamp_batch(self, records: list[tuple], clock: Callable[[], int]) -> list[bytes]:
        """Stamp what one producer message carried (`ingest.messages.unpack_inner`).

        Returns the envelopes to publish, in order; a record that is not a well-formed
        EVENT is counted in `bad_messages` and skipped. `clock()` gives each envelope
        its `pub_ns`. This is `stamp` inlined into one loop over the batch's payloads
        (sliced once from the batch): the bus's hot path.
        """
        c = self.counters
        c["received"] += len(records)
        topics = self.topics
        epoch_b = self.epoch_b
        join = b"".join
        out = []
        for kind, _, _, _, _, payload in records:
            a = payload.find(b" ") if kind == EVENT else -1
            b = payload.find(b" ", a + 1) if a > 0 else -1
            if b < 0:
                c["bad_messages"] += 1
                continue
            topic = payload[:a]
            t = topics.get(topic)
            if t is None:
                try:
                    t = topics[topic] = _Topic.new(topic)
                except ValueError:
                    c["bad_messages"] += 1
                    continue
            seq = t.seq = t.seq + 1
            t.last = env = join((t.head, epoch_b, b',"seq":%d,"pub_ns":%d,"type":"' % (
                seq, clock()), payload[a + 1:b], b'","event":', payload[b + 1:], b"}"))
            out.append(env)
        return out

    def cache_reply(self, prefix: bytes) -> bytes:
        self.counters["cache_requests"] += 1
        msgs = [t.last[t.last.index(b" ") + 1:] for name, t in sorted(self.topics.items())
                if t.last is not None and name.startswith(prefix)]
        return b'{"epoch":%d,"messages":[%s]}' % (self.epoch, b",".join(msgs))


def _queued(recv: Callable[[int], Any]) -> Iterator[Any]:
    """What a socket has queued: `recv(zmq.NOBLOCK)` until zmq.Again."""
    while True:
        try:
            yield recv(zmq.NOBLOCK)
        except zmq.Again:
            return


def to_msgpack(json_msg: bytes) -> bytes:
    """The msgpack form of a stamped JSON bus message (books become ticks)."""
    topic, payload = schema.split_frame(json_msg)
    env, event = schema.decode_envelope_json(payload)
    if isinstance(event, schema.MarketDataL2Event):
        event = schema.l2_to_ticks(event)
        env = msgspec.structs.replace(env, type="MarketDataL2EventTicks", event=event)
    return schema.frame(topic, schema.encode_envelope_msgpack(env))


def _bind(sock: zmq.Socket, *endpoints: str) -> None:
    for ep in endpoints:
        sock.bind(ep)


def run(cfg: Config) -> int:
    cfg.run_path.mkdir(parents=True, exist_ok=True)
    host = cfg.bus.bind_host
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, batch_hwm(cfg.bus.sndhwm, 64))  # producers send batches
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(cfg.ipc("bus.in"))
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, cfg.bus.sndhwm)
    pub.setsockopt(zmq.LINGER, 0)
    _bind(pub, f"tcp://{host}:{cfg.port('bus', 'json_port')}", cfg.ipc("bus.json"))
    mpub = ctx.socket(zmq.XPUB)
    mpub.setsockopt(zmq.SNDHWM, cfg.bus.sndhwm)
    mpub.setsockopt(zmq.LINGER, 0)
    _bind(mpub, f"tcp://{host}:{cfg.port('bus', 'msgpack_port')}", cfg.ipc("bus.msgpack"))
    cache = ctx.socket(zmq.ROUTER)
    cache.setsockopt(zmq.LINGER, 0)
    _bind(cache, f"tcp://{host}:{cfg.port('bus', 'cache_port')}", cfg.ipc("bus.cache"))

    core = BusCore(epoch=time.time_ns())
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
    signal.signal(signal.SIGINT, lambda s, f: stop.append(s))
    log.info("bus: epoch %d; JSON on tcp://%s:%d, msgpack on tcp://%s:%d, cache on "
             "tcp://%s:%d", core.epoch, host, cfg.port("bus", "json_port"), host,
             cfg.port("bus", "msgpack_port"), host, cfg.port("bus", "cache_port"))
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    poller.register(mpub, zmq.POLLIN)
    poller.register(cache, zmq.POLLIN)
    poll = poller.poll
    msgpack_subs = 0
    stats_ns = int(cfg.bus.stats_interval_s * 1e9)
    next_stats = time.monotonic_ns() + stats_ns
    counters = core.counters
    stamp_batch = core.stamp_batch
    # pyzmq's Python-level Socket.send only adds routing_id/group handling; the Cython
    # send under it is ~0.3-0.5 us per message cheaper (measured: 3.3 -> 2.9 us per send
    # at 20 k msg/s, I/O thread included).
    send = super(zmq.Socket, pub).send
    recv = pull.recv
    clock = time.time_ns

    def publish_all(msgs: list[bytes]) -> None:
        """Send stamped envelopes on the JSON PUB (and the msgpack one if subscribed).

        Callers stamp a whole producer batch first and send it here back to back:
        libzmq's I/O thread then wakes once per burst and writes it in one go instead
        of once per message (measured at 20 k msg/s in bursts of 20: the I/O thread's
        CPU per message halves, 4.5 -> 2.2 us, and the subscriber's receive cost drops
        too). The first envelope waits for the stamping of the rest, ~1.5 us each.
        """
        for m in msgs:
            send(m)
        counters["published"] += len(msgs)
        if msgpack_subs:
            for m in msgs:
                try:
                    mpub.send(to_msgpack(m))
                except (ValueError, msgspec.DecodeError) as e:
                    counters["msgpack_errors"] += 1
                    log.warning("msgpack conversion failed for %s: %s", m[:60], e)

    def take(raw: bytes) -> int:
        """One message from a producer (an EVENT or a BATCH of them); how many it held."""
        try:
            records = unpack_inner(raw)
        except MessageError as e:
            counters["bad_messages"] += 1
            log.warning("bad batch dropped: %s", e)
            return 0
        publish_all(stamp_batch(records, clock))
        return len(records)

    def publish_own(topic: bytes, type_name: bytes, body: bytes) -> None:
        """The bus's own events (its system state and stats), stamped like any other."""
        publish_all([core.stamp(topic, type_name, body, clock())])

    publish_own(b"system", b"SystemStateEvent", _json.encode(schema.SystemStateEvent(
        timestamp=schema.ns_to_rfc3339(clock()), service_name="bus", status_code="CONNECTED",
        status_message=f"bus started, epoch {core.epoch}")))
    try:
        while not stop:
            for sock, _ in poll(500):
                if sock is pull:
                    # A BATCH is a producer's whole burst (bookd: one per drain pass),
                    # most likely all there is: back to poll rather than end a drain
                    # with zmq.Again, which costs ~4-6 us in pyzmq (a poll ~1.5 us).
                    # Lone events come in streams (a bench; ingest's trades): drain
                    # those, or a poll per event doubles the bus's CPU (measured with
                    # bench/bench_bus.py --batch 1: 5.3 -> 12 us per event).
                    if take(recv()) == 1:
                        for _ in range(DRAIN):
                            try:
                                raw = recv(zmq.NOBLOCK)
                            except zmq.Again:
                                break
                            take(raw)
                elif sock is mpub:
                    for sub in _queued(mpub.recv):
                        if sub[:1] == b"\x01":
                            msgpack_subs += 1
                        elif sub[:1] == b"\x00":
                            msgpack_subs = max(0, msgpack_subs - 1)
                elif sock is cache:
                    for parts in _queued(cache.recv_multipart):
                        ident, req = parts[0], parts[-1]
                        delim = [b""] if len(parts) > 2 else []
                        cache.send_multipart([ident, *delim, core.cache_reply(req)])
            now = time.monotonic_ns()
            if now >= next_stats:
                next_stats = now + stats_ns
                ev = schema.StatsEvent(timestamp=schema.ns_to_rfc3339(clock()), process="bus",
                                       pid=os.getpid(), counters=dict(counters),
                                       gauges={"topics": float(len(core.topics)),
                                               "msgpack_subscriptions": float(msgpack_subs)})
                publish_own(b"stats", b"StatsEvent", _json.encode(ev))
    finally:
        # Drain: publish what producers already handed over (bounded), then give the
        # PUB sockets a moment to flush before closing.
        drained = sum(take(msg) for msg in islice(_queued(recv), 50 * DRAIN))
        pub.setsockopt(zmq.LINGER, 200)
        mpub.setsockopt(zmq.LINGER, 200)
        log.info("bus: stopping after %d messages (%d drained at stop)",
                 counters["published"], drained)
        for s in (pull, pub, mpub, cache):
            s.close()
        ctx.term()
    return 0
