"""ingest/messages.py: the 32-byte header, control round trips, verbatim frames, events."""

from __future__ import annotations

import struct

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest import messages as m
from ingest.messages import (
    BATCH,
    CONTROL,
    EVENT,
    FRAME,
    HEADER_SIZE,
    HEADER_VERSION,
    NO_PAIR,
    Batcher,
    ConnectionState,
    EventBatch,
    MessageError,
    PairInfo,
    ResyncRequest,
    Stale,
    decode_control,
    decode_control_payload,
    inner_messages,
    pack_batch,
    pack_control,
    pack_event,
    pack_frame,
    split_event,
    unpack_batch,
    unpack_header,
    unpack_inner,
)
from tests import vectors

PROPS = settings(max_examples=100, deadline=None)
U64 = st.integers(0, 2**64 - 1)
PAIR_INDEX = st.integers(0, 0xFFFF)
TEXT = st.text(max_size=40)

CONTROLS = [
    PairInfo(conn_id=7, pair="BTC/USD", pair_index=0, depth=10, price_precision=1,
             qty_precision=8),
    PairInfo(conn_id=2**64 - 1, pair="MINA/GBP", pair_index=3, depth=25, price_precision=4,
             qty_precision=8, status="cancel_only", price_increment="0.0001",
             qty_increment="0.00000001"),
    Stale(conn_id=1, pair="ETH/USD", reason="snapshot timeout"),
    Stale(conn_id=1, pair="ETH/USD", reason="silent", silent_ns=61_000_000_000),
    ResyncRequest(pairs=("BTC/USD", "ETH/USD"), reason="checksum mismatch", conn_id=9),
    ResyncRequest(pairs=(), reason="crossed"),
    ConnectionState(conn_id=5, up=True),
    ConnectionState(conn_id=5, up=False, reason="heartbeat timeout"),
]


def test_header_is_32_bytes():
    assert HEADER_SIZE == 32 == struct.calcsize("<BBHIQQQ")


def test_every_control_struct_is_covered():
    assert {type(c) for c in CONTROLS} == set(m.Control.__args__)


@pytest.mark.parametrize("ctl", CONTROLS, ids=lambda c: type(c).__name__)
def test_control_round_trip(ctl):
    msg = pack_control(ctl, conn_id=42, pair_index=3)
    assert unpack_header(msg) == (CONTROL, 3, 42, 0, 0)
    back = decode_control(msg)
    assert back == ctl and type(back) is type(ctl)
    assert unpack_header(pack_control(ctl))[1:3] == (NO_PAIR, 0)


@PROPS
@given(st.one_of(
    st.builds(PairInfo, conn_id=U64, pair=TEXT, pair_index=PAIR_INDEX,
              depth=st.sampled_from([10, 25, 100, 500, 1000]), price_precision=st.integers(0, 18),
              qty_precision=st.integers(0, 18), status=TEXT, price_increment=TEXT,
              qty_increment=TEXT),
    st.builds(Stale, conn_id=U64, pair=TEXT, reason=TEXT, silent_ns=U64),
    st.builds(ResyncRequest, pairs=st.lists(TEXT, max_size=5).map(tuple), reason=TEXT,
              conn_id=U64),
    st.builds(ConnectionState, conn_id=U64, up=st.booleans(), reason=TEXT),
), U64, PAIR_INDEX)
def test_control_round_trip_property(ctl, conn_id, pair_index):
    msg = pack_control(ctl, conn_id, pair_index)
    assert unpack_header(msg) == (CONTROL, pair_index, conn_id, 0, 0)
    assert decode_control(msg) == ctl


@PROPS
@given(st.binary(max_size=300), U64, PAIR_INDEX, U64, U64)
def test_frame_round_trip(frame, conn_id, pair_index, seq, recv_ns):
    msg = pack_frame(frame, conn_id, pair_index, seq, recv_ns)
    assert unpack_header(msg) == (FRAME, pair_index, conn_id, seq, recv_ns)
    assert msg[HEADER_SIZE:] == frame


@pytest.mark.skipif(not vectors.available(), reason="no vectors")
def test_pack_frame_keeps_real_frames_verbatim():
    for i, vf in enumerate(vectors.iter_frames(), 1):
        msg = pack_frame(vf.frame, 2**63 + i, i % 7, i, 1_700_000_000_000_000_000 + i)
        assert msg[HEADER_SIZE:] == vf.frame  # byte for byte, never re-serialised
        assert len(msg) == HEADER_SIZE + len(vf.frame)
        assert unpack_header(msg) == (FRAME, i % 7, 2**63 + i, i, 1_700_000_000_000_000_000 + i)


def test_short_and_unknown_messages_raise():
    good = pack_frame(b"{}", 1, 0, 1, 2)
    for short in (b"", good[:HEADER_SIZE - 1], b"\x01"):
        with pytest.raises(MessageError, match="shorter"):
            unpack_header(short)
    assert unpack_header(good[:HEADER_SIZE])[0] == FRAME  # a bare header is long enough
    for kind in (0, 5, 255):
        with pytest.raises(MessageError, match="kind"):
            unpack_header(bytes([kind]) + good[1:])
    for version in (0, HEADER_VERSION + 1, 255):
        with pytest.raises(MessageError, match="version"):
            unpack_header(good[:1] + bytes([version]) + good[2:])


def test_bad_control_payloads_raise():
    header = pack_control(Stale(1, "X/Y", "r"))[:HEADER_SIZE]
    bad_payloads = [
        b"",
        b"\xc1",  # never used in msgpack
        msgspec.msgpack.encode({"kind": "nope", "conn_id": 1}),
        msgspec.msgpack.encode({"kind": "stale", "conn_id": "1", "pair": "X", "reason": "r"}),
        msgspec.msgpack.encode({"kind": "conn", "up": True}),  # missing conn_id
        b'{"channel":"book"}',  # a frame payload is not a control
    ]
    for payload in bad_payloads:
        with pytest.raises(MessageError):
            decode_control(header + payload)


def test_events_round_trip_and_split():
    body = b'{"type":"MarketDataL2Event","pair":"BTC/USD","note":"a b c"}'
    msg = pack_event("md.l2.BTC/USD", "MarketDataL2Event", body, recv_ns=123)
    assert unpack_header(msg) == (EVENT, NO_PAIR, 0, 0, 123)
    assert split_event(msg) == ("md.l2.BTC/USD", "MarketDataL2Event", body)
    empty = pack_event("t", "T", b"")
    assert split_event(empty) == ("t", "T", b"")


@PROPS
@given(st.text(st.characters(blacklist_characters=" ", blacklist_categories=("Cs",)),
               min_size=1, max_size=30),
       st.text(st.characters(blacklist_characters=" ", blacklist_categories=("Cs",)),
               min_size=1, max_size=30),
       st.binary(max_size=200))
def test_event_round_trip_property(topic, type_name, body):
    assert split_event(pack_event(topic, type_name, body)) == (topic, type_name, body)


def test_bad_events_raise():
    with pytest.raises(MessageError):
        pack_event("a topic", "T", b"{}")
    with pytest.raises(MessageError):
        pack_event("t", "a type", b"{}")
    header = pack_event("t", "T", b"")[:HEADER_SIZE]
    for body in (b"", b"topic", b" T {}", b"t  {}", b"topiconly {}"[:9]):
        with pytest.raises(MessageError):
            split_event(header + body)


def test_batch_round_trip_keeps_every_message_and_order():
    msgs = [pack_frame(b'{"channel":"book"}', 7, 1, n, 100 + n) for n in range(1, 6)]
    msgs.insert(2, pack_control(ResyncRequest(("BTC/USD",), "test")))
    batch = pack_batch(msgs)
    assert unpack_header(batch)[0] == BATCH
    assert unpack_batch(batch) == msgs
    assert unpack_batch(pack_batch([])) == []


def test_malformed_batches_raise():
    batch = pack_batch([pack_frame(b"abc", 1, 0, 1, 2), pack_frame(b"defg", 1, 0, 2, 3)])
    for cut in (HEADER_SIZE + 2, len(batch) - 1):
        with pytest.raises(MessageError, match="cut short"):
            unpack_batch(batch[:cut])
    with pytest.raises(MessageError, match="stray"):
        unpack_batch(batch + b"x")
    with pytest.raises(MessageError, match="not a batch"):
        unpack_batch(pack_frame(b"abc", 1, 0, 1, 2))


def test_batcher_sends_a_lone_message_as_itself_and_flags_a_full_batch():
    b = Batcher(limit=3)
    assert b.take() is None
    one = pack_frame(b"x", 1, 0, 1, 2)
    assert b.add(one) is False and b.take() == one
    assert [b.add(one), b.add(one), b.add(one)] == [False, False, True]
    assert unpack_batch(b.take()) == [one, one, one] and b.pending == []


def test_inner_messages_unwraps_a_batch_and_passes_a_lone_message_through():
    one = pack_frame(b"x", 1, 0, 1, 2)
    two = pack_control(ResyncRequest(("ETH/USD",), "test"))
    assert inner_messages(one) == (one,)
    assert list(inner_messages(pack_batch([one, two]))) == [one, two]
    with pytest.raises(MessageError):
        inner_messages(pack_batch([one, two])[:-1])


EVENTS = st.lists(st.tuples(st.sampled_from(["book.BTC/USD", "book.ETH/USD", "system"]),
                            st.sampled_from(["MarketDataL2Event", "SystemStateEvent"]),
                            st.binary(max_size=60)), max_size=12)


@PROPS
@given(EVENTS, st.integers(1, 5))
def test_event_batch_sends_what_batcher_sends_for_packed_events(events, limit):
    ref, fast = Batcher(limit), EventBatch(limit)
    sent_ref, sent_fast = [], []
    for topic, type_name, body in events:
        if ref.add(pack_event(topic, type_name, body)):
            sent_ref.append(ref.take())
        if fast.add(topic, type_name, body):
            sent_fast.append(fast.take())
    sent_ref.append(ref.take())
    sent_fast.append(fast.take())
    assert sent_fast == sent_ref
    assert fast.count == 0 and fast.take() is None
    with pytest.raises(MessageError):
        fast.add("a topic", "T", b"{}")


def _slow_inner(msg: bytes) -> list[tuple]:
    """What inner_messages + unpack_header give, in unpack_inner's shape."""
    out = []
    for sub in inner_messages(msg):
        try:
            out.append((*unpack_header(sub), sub[HEADER_SIZE:]))
        except MessageError as e:
            out.append((m.BAD, 0, 0, 0, 0, str(e)))
    return out


def test_unpack_inner_is_inner_messages_plus_unpack_header():
    frame = pack_frame(b'{"channel":"book"}', 7, 1, 3, 99)
    ctl = pack_control(CONTROLS[0], 7, 0)
    event = pack_event("t", "T", b"{}")
    bad_version = bytes([FRAME, 9]) + frame[2:]
    bad_kind = bytes([77]) + frame[1:]
    nested = pack_batch([frame])
    cases = [frame, ctl, event, b"", b"\x01short", bad_version, bad_kind,
             pack_batch([frame, ctl, b"tiny", bad_version, event, bad_kind, nested, frame]),
             pack_batch([]), pack_batch([b""])]
    for msg in cases:
        assert unpack_inner(msg) == _slow_inner(msg), msg
    recs = unpack_inner(pack_batch([frame, ctl]))
    assert recs[0] == (FRAME, 1, 7, 3, 99, b'{"channel":"book"}')
    assert decode_control_payload(recs[1][5]) == CONTROLS[0]
    for bad in (pack_batch([frame])[:-1], pack_batch([frame]) + b"x", bytes([BATCH]) * 10):
        with pytest.raises(MessageError):
            inner_messages(bad)
        with pytest.raises(MessageError):
            unpack_inner(bad)


@PROPS
@given(st.lists(st.binary(max_size=50), max_size=6))
def test_unpack_inner_on_arbitrary_batches(payloads):
    msg = pack_batch([pack_frame(b, 1, 2, 3, 4) if k % 2 else b
                      for k, b in enumerate(payloads)])
    assert unpack_inner(msg) == _slow_inner(msg)
