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

import msgspec
import zmq

from bus import schema
from ingest.config import Config
from ingest.messages import (
    EVENT,
    HEADER_SIZE,
    HEADER_VERSION,
    MessageError,
    batch_hwm,
    inner_messages,
)

log = logging.getLogger("bus")
DRAIN = 5000
_json = msgspec.json.Encoder()


class _Topic:
    __slots__ = ("seq", "head", "last")

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
            if not topic or b" " in topic or b'"' in topic or b"\\" in topic:
                raise ValueError(f"bad topic {topic[:60]!r}")
            t = self.topics[topic] = _Topic(topic)
        t.seq += 1
        msg = b"".join((t.head, self.epoch_b, b',"seq":%d,"pub_ns":%d,"type":"' % (t.seq, pub_ns),
                        type_name, b'","event":', event_json, b"}"))
        t.last = msg
        return msg

    def cache_reply(self, prefix: bytes) -> bytes:
        self.counters["cache_requests"] += 1
        msgs = [t.last[t.last.index(b" ") + 1:] for name, t in sorted(self.topics.items())
                if t.last is not None and name.startswith(prefix)]
        return b'{"epoch":%d,"messages":[%s]}' % (self.epoch, b",".join(msgs))


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
    msgpack_subs = 0
    stats_ns = int(cfg.bus.stats_interval_s * 1e9)
    next_stats = time.monotonic_ns() + stats_ns
    counters = core.counters
    stamp = core.stamp
    send = pub.send
    recv = pull.recv
    clock = time.time_ns

    def publish(topic: bytes, type_name: bytes, body: bytes) -> None:
        nonlocal msgpack_subs
        msg = stamp(topic, type_name, body, clock())
        send(msg)
        counters["published"] += 1
        if msgpack_subs:
            try:
                mpub.send(to_msgpack(msg))
            except (ValueError, msgspec.DecodeError) as e:
                counters["msgpack_errors"] += 1
                log.warning("msgpack conversion failed for %s: %s", topic[:60], e)

    def take(msg: bytes) -> None:
        """One EVENT message from a producer: stamp and publish it, or count it bad."""
        counters["received"] += 1
        if len(msg) <= HEADER_SIZE or msg[0] != EVENT or msg[1] != HEADER_VERSION:
            counters["bad_messages"] += 1
            return
        a = msg.find(b" ", HEADER_SIZE)
        b = msg.find(b" ", a + 1)
        if a < 0 or b < 0:
            counters["bad_messages"] += 1
            return
        try:
            publish(msg[HEADER_SIZE:a], msg[a + 1:b], msg[b + 1:])
        except ValueError:
            counters["bad_messages"] += 1

    publish(b"system", b"SystemStateEvent", _json.encode(schema.SystemStateEvent(
        timestamp=schema.ns_to_rfc3339(clock()), service_name="bus", status_code="CONNECTED",
        status_message=f"bus started, epoch {core.epoch}")))
    try:
        while not stop:
            ready = dict(poller.poll(500))
            if pull in ready:
                for _ in range(DRAIN):
                    try:
                        msg = recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        subs = inner_messages(msg)
                    except MessageError as e:
                        counters["bad_messages"] += 1
                        log.warning("bad batch dropped: %s", e)
                        continue
                    for sub in subs:
                        take(sub)
            if mpub in ready:
                while True:
                    try:
                        sub = mpub.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if sub[:1] == b"\x01":
                        msgpack_subs += 1
                    elif sub[:1] == b"\x00":
                        msgpack_subs = max(0, msgpack_subs - 1)
            if cache in ready:
                while True:
                    try:
                        parts = cache.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
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
                publish(b"stats", b"StatsEvent", _json.encode(ev))
    finally:
        # Drain: publish what producers already handed over (bounded), then give the
        # PUB sockets a moment to flush before closing.
        drained = 0
        for _ in range(50 * DRAIN):
            try:
                msg = recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                subs = inner_messages(msg)
            except MessageError:
                counters["bad_messages"] += 1
                continue
            for sub in subs:
                take(sub)
                drained += 1
        pub.setsockopt(zmq.LINGER, 200)
        mpub.setsockopt(zmq.LINGER, 200)
        log.info("bus: stopping after %d messages (%d drained at stop)",
                 counters["published"], drained)
        for s in (pull, pub, mpub, cache):
            s.close()
        ctx.term()
    return 0
