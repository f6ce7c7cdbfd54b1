"""BusCore (bus/service.py) without sockets: envelope stamping, the last-value cache and
the msgpack conversion.

The bus never re-encodes an event: it splices the producer's JSON into the envelope.
These tests hold the spliced bytes to the contract in bus/schema.py: the stamped frame
must be exactly what `encode_envelope_json(make_envelope(...))` would have produced.
"""

from __future__ import annotations

import json

import msgspec
import pytest

from bus import schema
from bus.schema import (
    HaltDecision,
    HaltTrigger,
    MarketDataL2Event,
    MarketDataL2EventTicks,
    MarketDataOHLCVEvent,
    MarketDataTradeEvent,
    PotentialHaltTriggerEvent,
    StatsEvent,
    SystemStateEvent,
    decode_envelope_json,
    decode_envelope_msgpack,
    encode_envelope_json,
    l2_to_ticks,
    make_envelope,
    split_frame,
    topic_for,
)
from bus.service import BusCore, to_msgpack
from ingest.messages import (
    HEADER_SIZE,
    ResyncRequest,
    pack_batch,
    pack_control,
    pack_event,
    unpack_inner,
)

EPOCH = 1_786_923_423_403_052_000
BIG_EPOCH = 2**64 - 1  # the envelope's epoch is a u64: the largest must survive
PUB_NS = 1_786_923_423_500_000_000
_enc = msgspec.json.Encoder()

L2 = MarketDataL2Event(
    pair="BTC/USD", timestamp="2023-10-06T17:35:55.440295Z",
    bids=[("45283.5", "0.10000000"), ("45283.4", "1.54582015"), ("45282.1", "0.10000000")],
    asks=[("45285.2", "0.00100000"), ("45286.4", "1.54571953"), ("45286.6", "1.54571109")],
    checksum=3310070434, conn_id=1, exchange_ts_ns=1696613755440295000,
    recv_ns=1696613755442107345, snapshot=True, depth=10, price_precision=1,
    qty_precision=8)
# Values a float would get wrong, and the uint64 boundary in ticks.
L2_EXACT = MarketDataL2Event(
    pair="MEME/USD", timestamp=None,
    bids=[("1234567890.12345678", "184467440737.09551615"), ("0.00000001", "0.00005100")],
    asks=[("1234567890.12345679", "99999999999.99999999")],
    checksum=0, conn_id=2**64 - 1, exchange_ts_ns=None, recv_ns=1, snapshot=False,
    depth=25, price_precision=8, qty_precision=8)
TRADE = MarketDataTradeEvent(
    pair="MATIC/USD", trade_id=4665906, side="sell", price="0.5117", qty="40.0",
    ord_type="market", timestamp="2023-09-25T07:49:37.708706Z", recv_ns=1695628177709912004)
OHLC = MarketDataOHLCVEvent(
    pair="MATIC/USD", interval="5m", timestamp="2023-10-04T16:25:00.000000000Z",
    open="0.5624", high="0.5628", low="0.5622", close="0.5627", volume="30927.68066226",
    vwap="0.5626", count=12, closed=False, recv_ns=1696436790524394914)
SYSTEM = SystemStateEvent(timestamp="2026-08-16T23:37:03.402652000Z", service_name="ingest",
                          status_code="online", status_message='Kraken "engine" online \\o/')
TRIGGER = PotentialHaltTriggerEvent(
    timestamp="2026-08-16T23:40:00.000000000Z", source_module="bookd",
    error_code="CHECKSUM_MISMATCHES", reason="5 checksum mismatches in 60 s",
    details="last: local 1234 != exchange 4249465476", pair="BTC/USD")
STATS = StatsEvent(timestamp="2026-08-16T23:37:10.000000000Z", process="ingest", pid=4242,
                   counters={"frames": 1830, "drops": 0}, gauges={"lag_ms": 0.4})
HALT = HaltDecision(
    timestamp="2026-08-16T23:40:00.500000000Z", reason="checksum mismatches on BTC/USD",
    triggers=[HaltTrigger(source="bookd", error_code="CHECKSUM_MISMATCHES",
                          reason="5 in 60 s", pair="BTC/USD",
                          at="2026-08-16T23:40:00.000000000Z")],
    stopped=["ingest", "bookd", "bus"])
EVENTS = [L2, L2_EXACT, TRADE, OHLC, SYSTEM, TRIGGER, STATS, HALT]


def stamp(core: BusCore, event, pub_ns: int = PUB_NS) -> bytes:
    """What the bus does with a producer's EVENT message for `event`."""
    return core.stamp(topic_for(event).encode(), type(event).__name__.encode(),
                      _enc.encode(event), pub_ns)


# --- stamping ---------------------------------------------------------------------------
@pytest.mark.parametrize("event", EVENTS, ids=lambda e: f"{type(e).__name__}-{topic_for(e)}")
def test_stamped_envelope_decodes_to_the_same_event(event):
    core = BusCore(epoch=EPOCH)
    msg = stamp(core, event)
    topic, payload = split_frame(msg)
    assert topic == topic_for(event)
    env, got = decode_envelope_json(payload)
    assert got == event and type(got) is type(event)
    assert (env.v, env.topic, env.epoch, env.seq, env.pub_ns, env.type) == (
        schema.SCHEMA_VERSION, topic, EPOCH, 1, PUB_NS, type(event).__name__)
    # Byte for byte what the schema module would encode: the splice is the contract.
    assert payload == encode_envelope_json(make_envelope(event, epoch=EPOCH, seq=1,
                                                         pub_ns=PUB_NS))
    assert list(json.loads(payload)) == ["v", "topic", "epoch", "seq", "pub_ns", "type",
                                         "event"]


def test_seq_counts_per_topic_from_one():
    core = BusCore(epoch=EPOCH)
    order = [L2, TRADE, L2, L2, SYSTEM, TRADE, L2_EXACT, L2, SYSTEM, L2_EXACT]
    seqs: dict[str, list[int]] = {}
    for i, event in enumerate(order):
        env, _ = decode_envelope_json(split_frame(stamp(core, event, PUB_NS + i))[1])
        seqs.setdefault(env.topic, []).append(env.seq)
        assert env.pub_ns == PUB_NS + i
    assert seqs == {"book.BTC/USD": [1, 2, 3, 4], "trade.MATIC/USD": [1, 2],
                    "system": [1, 2], "book.MEME/USD": [1, 2]}
    assert {t.decode(): v.seq for t, v in core.topics.items()} == {
        k: len(v) for k, v in seqs.items()}


def test_stamp_batch_is_stamp_for_each_event_of_a_producer_batch():
    """The bus's hot path (a producer's BATCH, stamped in one loop) gives the same bytes,
    seqs and cache as `stamp` one event at a time, and counts what it received."""
    order = [L2, TRADE, L2, L2, SYSTEM, TRADE, L2_EXACT, L2, SYSTEM, L2_EXACT] + EVENTS
    msgs = [pack_event(topic_for(e), type(e).__name__, _enc.encode(e)) for e in order]
    one, batched = BusCore(epoch=EPOCH), BusCore(epoch=EPOCH)
    expected = [stamp(one, e, PUB_NS + i) for i, e in enumerate(order)]
    clock = iter(range(PUB_NS, PUB_NS + len(order))).__next__
    got = batched.stamp_batch(unpack_inner(pack_batch(msgs)), clock)
    assert got == expected
    assert batched.cache_reply(b"") == one.cache_reply(b"")
    assert batched.counters["received"] == len(order)
    assert batched.counters["bad_messages"] == 0
    # A lone (unbatched) event goes the same way.
    assert batched.stamp_batch(unpack_inner(msgs[0]), lambda: PUB_NS) == [
        stamp(one, order[0])]


def test_stamp_batch_counts_and_skips_bad_records():
    good = pack_event("system", "SystemStateEvent", _enc.encode(SYSTEM))
    header = good[:HEADER_SIZE]
    bad = [
        header,                                                  # no payload at all
        header + b"system",                                      # no type
        header + b" SystemStateEvent {}",                        # empty topic
        header + b'book."x SystemStateEvent {}',                 # a quote in the topic
        header + b"book.A\\B SystemStateEvent {}",             # a backslash in the topic
        header + b"book.\xff SystemStateEvent {}",               # a topic that is not UTF-8
        pack_control(ResyncRequest(pairs=("BTC/USD",), reason="x")),  # not an EVENT
        b"\x03\x07" + good[2:],                                 # unknown header version
        b"\x03",                                                 # shorter than a header
    ]
    core = BusCore(epoch=EPOCH)
    got = core.stamp_batch(unpack_inner(pack_batch([bad[0], good, *bad[1:], good])),
                           lambda: PUB_NS)
    assert [decode_envelope_json(split_frame(m)[1])[0].seq for m in got] == [1, 2]
    assert core.counters["received"] == len(bad) + 2
    assert core.counters["bad_messages"] == len(bad)
    assert list(core.topics) == [b"system"]


@pytest.mark.parametrize("epoch", [0, 1, EPOCH, BIG_EPOCH])
def test_epoch_is_in_every_envelope_exactly(epoch):
    core = BusCore(epoch=epoch)
    for event in EVENTS * 2:
        payload = split_frame(stamp(core, event))[1]
        assert decode_envelope_json(payload)[0].epoch == epoch
        assert json.loads(payload)["epoch"] == epoch  # an exact integer, not a float
    reply = json.loads(core.cache_reply(b""))
    assert reply["epoch"] == epoch
    assert {m["epoch"] for m in reply["messages"]} == {epoch}


@pytest.mark.parametrize("topic", [b"", b"book.BTC/USD x", b" book.BTC/USD", b'book."x',
                                   b"book.A\\B", b"a b"])
def test_bad_topics_are_rejected_and_leave_no_trace(topic):
    core = BusCore(epoch=EPOCH)
    with pytest.raises(ValueError, match="bad topic"):
        core.stamp(topic, b"SystemStateEvent", _enc.encode(SYSTEM), PUB_NS)
    assert core.topics == {}
    assert json.loads(core.cache_reply(b"")) == {"epoch": EPOCH, "messages": []}
    # A good topic afterwards still starts at seq 1.
    assert decode_envelope_json(split_frame(stamp(core, SYSTEM))[1])[0].seq == 1


def test_topic_with_json_special_characters_is_escaped_in_the_envelope():
    # Topics are bytes from producers; non-ASCII ones must still give valid JSON with
    # the topic spelled back exactly.
    core = BusCore(epoch=EPOCH)
    msg = core.stamp("book.ÄÖ/€".encode(), b"StatsEvent", _enc.encode(STATS), PUB_NS)
    topic, payload = split_frame(msg)
    assert topic == "book.ÄÖ/€"
    assert json.loads(payload)["topic"] == topic


# --- the last-value cache ---------------------------------------------------------------
def _cache(core: BusCore, prefix: bytes) -> dict:
    reply = core.cache_reply(prefix)
    doc = json.loads(reply)
    assert set(doc) == {"epoch", "messages"}
    return doc


def test_cache_reply_holds_the_latest_envelope_of_each_topic_by_prefix():
    core = BusCore(epoch=EPOCH)
    usdt = msgspec.structs.replace(L2, pair="BTC/USDT")
    newer = msgspec.structs.replace(L2, bids=[("45290.0", "2.00000000")], snapshot=False)
    for event in (L2, usdt, TRADE, SYSTEM, L2, newer, OHLC):
        stamp(core, event)

    everything = _cache(core, b"")
    assert everything["epoch"] == EPOCH
    topics = [m["topic"] for m in everything["messages"]]
    assert topics == sorted(topics) == ["book.BTC/USD", "book.BTC/USDT",
                                        "ohlc.5m.MATIC/USD", "system", "trade.MATIC/USD"]
    # The latest envelope of book.BTC/USD is `newer` at seq 3, as published.
    latest = everything["messages"][0]
    assert latest["seq"] == 3
    payload = json.dumps(latest, separators=(",", ":")).encode()
    assert decode_envelope_json(payload)[1] == newer

    books = _cache(core, b"book.")
    assert [m["topic"] for m in books["messages"]] == ["book.BTC/USD", "book.BTC/USDT"]
    # A prefix is a byte prefix, like a ZMQ subscription without the trailing space:
    # the asker filters by exact topic (bus.tail does).
    assert [m["topic"] for m in _cache(core, b"book.BTC/USD")["messages"]] == [
        "book.BTC/USD", "book.BTC/USDT"]
    assert [m["topic"] for m in _cache(core, b"book.BTC/USDT")["messages"]] == [
        "book.BTC/USDT"]
    assert [m["topic"] for m in _cache(core, b"system")["messages"]] == ["system"]
    assert _cache(core, b"halt")["messages"] == []
    assert _cache(core, b"nothing.like.this")["messages"] == []
    assert core.counters["cache_requests"] == 7


def test_cache_reply_messages_are_the_published_envelopes_byte_for_byte():
    core = BusCore(epoch=EPOCH)
    published = {}
    for event in (L2, TRADE, L2_EXACT, HALT):
        msg = stamp(core, event)
        topic, payload = split_frame(msg)
        published[topic] = payload
    reply = core.cache_reply(b"")
    # Spliced, not re-encoded: each published payload appears verbatim in the reply.
    for payload in published.values():
        assert payload in reply
    assert reply == b'{"epoch":%d,"messages":[%s]}' % (
        EPOCH, b",".join(published[t] for t in sorted(published)))


def test_empty_cache():
    assert _cache(BusCore(epoch=7), b"") == {"epoch": 7, "messages": []}


# --- msgpack ----------------------------------------------------------------------------
@pytest.mark.parametrize("event", [L2, L2_EXACT], ids=["kraken-example", "exact-u64"])
def test_to_msgpack_turns_books_into_exact_ticks(event):
    core = BusCore(epoch=BIG_EPOCH)
    stamp(core, event)
    json_msg = stamp(core, event, PUB_NS + 1)
    topic, payload = split_frame(to_msgpack(json_msg))
    assert topic == topic_for(event)
    env, got = decode_envelope_msgpack(payload)
    assert isinstance(got, MarketDataL2EventTicks)
    assert env.type == "MarketDataL2EventTicks"
    assert (env.v, env.topic, env.epoch, env.seq, env.pub_ns) == (
        schema.SCHEMA_VERSION, topic, BIG_EPOCH, 2, PUB_NS + 1)
    assert got == l2_to_ticks(event)
    # The ticks, spelled out: value * 10**precision, exactly.
    for side_dec, side_ticks in ((event.bids, got.bids), (event.asks, got.asks)):
        assert len(side_ticks) == len(side_dec)
        for (p, q), (pt, qt) in zip(side_dec, side_ticks, strict=True):
            assert pt == schema.decimal_to_ticks(p, event.price_precision)[0]
            assert qt == schema.decimal_to_ticks(q, event.qty_precision)[0]
    raw = msgspec.msgpack.decode(payload)
    assert all(isinstance(x, int) for lvl in raw["event"]["bids"] for x in lvl)
    if event is L2_EXACT:
        assert raw["event"]["bids"][0] == [123456789012345678, 18446744073709551615]
        assert raw["event"]["bids"][1] == [1, 5100]


@pytest.mark.parametrize("event", [TRADE, OHLC, SYSTEM, TRIGGER, STATS, HALT],
                         ids=lambda e: type(e).__name__)
def test_to_msgpack_keeps_other_events_unchanged(event):
    core = BusCore(epoch=EPOCH)
    json_msg = stamp(core, event)
    json_env, json_event = decode_envelope_json(split_frame(json_msg)[1])
    topic, payload = split_frame(to_msgpack(json_msg))
    env, got = decode_envelope_msgpack(payload)
    assert topic == json_env.topic
    assert env == json_env and got == event and type(got) is type(event)


def test_to_msgpack_refuses_a_book_beyond_uint64():
    # The service counts this as a msgpack error (it catches ValueError), never wraps.
    too_big = msgspec.structs.replace(L2_EXACT, asks=[("184467440737.09551616", "1.0")])
    msg = stamp(BusCore(epoch=EPOCH), too_big)
    with pytest.raises(schema.TickOverflowError):
        to_msgpack(msg)
    assert issubclass(schema.TickOverflowError, ValueError)
