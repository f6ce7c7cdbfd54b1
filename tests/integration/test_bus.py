"""The bus process end to end: `python -m bus --config <tmp toml>` as a subprocess, a
producer PUSHing EVENT messages to its `bus.in`, subscribers on its public sockets
(helpers and fixtures: bushelp.py; `bus.tail`: test_bus_tail.py).

Every bus here has its own namespace (never containing "krakenfeed"), a short temp run
directory and free ports (`harness.make_config`). Waits are bounded by `wait_for` or
poll timeouts; nothing asserts timing. Subscriptions in ZMQ take effect asynchronously
(the "slow joiner"), so a test that needs a subscriber to see a given message first
publishes warm-up messages until the subscriber receives one.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
import zmq

from bus import schema
from bus.schema import (
    MarketDataL2Event,
    StatsEvent,
    SystemStateEvent,
    decode_envelope_json,
    decode_envelope_msgpack,
    l2_to_ticks,
    split_frame,
    subscription_prefix,
)
from ingest.messages import HEADER_SIZE, pack_event
from tests.integration.bushelp import (
    EVERY_EVENT,
    TIMEOUT,
    BusProcess,
    Msg,
    Producer,
    ask_cache,
    book,
    candle,
    drain,
    subscriber,
    system,
    trade,
    warm_up,
)
from tests.integration.harness import wait_for

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
