"""ingest.subscriptions: request building, ack matching, rate-limit requeue, liveness, pacing."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest.subscriptions import (
    BOOK,
    INSTRUMENT,
    NS_PER_S,
    OHLC,
    TRADE,
    AckKind,
    Pacer,
    SubKey,
    SubscriptionTable,
    SubState,
)
from ingest.wire import decode_message

S = NS_PER_S
T0 = 1_800_000_000 * S

# Real frames (PROTOCOL.md 1.3/1.4): the captured MINA/GBP book ack (no req_id) and the
# captured refusal of depth 27 (no result, no symbol).
REAL_BOOK_ACK = (b'{"method":"subscribe","result":{"channel":"book","depth":25,"snapshot":true,'
                 b'"symbol":"MINA/GBP"},"success":true,"time_in":"2026-08-16T23:37:04.849274Z",'
                 b'"time_out":"2026-08-16T23:37:04.849309Z"}')
REAL_REFUSAL = (b'{"error":"Subscription depth not supported","method":"subscribe",'
                b'"success":false,"time_in":"2026-08-16T23:54:19.629313Z",'
                b'"time_out":"2026-08-16T23:54:19.629343Z"}')
REAL_UNSUB_ACK = (b'{"method":"unsubscribe","result":{"channel":"book","depth":25,'
                  b'"symbol":"MINA/GBP"},"success":true,'
                  b'"time_in":"2026-08-18T20:44:29.766514Z","time_out":"2026-08-18T20:44:29.766559Z"}')


def with_req_id(frame: bytes, req_id: int) -> bytes:
    return frame[:-1] + b',"req_id":' + str(req_id).encode() + b"}"


def ack(req_id: int | None, channel: str, symbol: str | None, *, method: str = "subscribe",
        success: bool = True, error: str | None = None, interval: int | None = None) -> bytes:
    obj: dict = {"method": method, "success": success}
    if success:
        result: dict = {"channel": channel}
        if symbol is not None:
            result["symbol"] = symbol
        if interval is not None:
            result["interval"] = interval
        obj["result"] = result
    else:
        obj["error"] = error or "refused"
        if symbol is not None:
            obj["symbol"] = symbol
    if req_id is not None:
        obj["req_id"] = req_id
    return json.dumps(obj).encode()


def table(batch: int = 25, **kw) -> SubscriptionTable:
    args = {"depth": 25, "symbols_per_request": batch, "ack_timeout_ns": 10 * S,
            "snapshot_timeout_ns": 10 * S, "silence_ns": 60 * S} | kw
    return SubscriptionTable(**args)


def books(*symbols: str) -> list[SubKey]:
    return [SubKey(BOOK, s) for s in symbols]


def feed(t: SubscriptionTable, frame: bytes, now: int = T0):
    return t.on_ack(decode_message(frame), now)


# -- request building ---------------------------------------------------------------------
def test_requests_carry_the_right_params_and_increasing_req_ids() -> None:
    t = table()
    t.add([SubKey(INSTRUMENT), *books("BTC/USD"), SubKey(TRADE, "BTC/USD"),
           SubKey(OHLC, "BTC/USD", 5)])
    reqs = [t.pop_request(T0) for _ in range(4)]
    assert t.pop_request(T0) is None
    assert [json.loads(r.text) for r in reqs] == [
        {"method": "subscribe", "params": {"channel": "instrument", "snapshot": True},
         "req_id": 1},
        {"method": "subscribe", "params": {"channel": "book", "symbol": ["BTC/USD"],
                                           "depth": 25, "snapshot": True}, "req_id": 2},
        {"method": "subscribe", "params": {"channel": "trade", "symbol": ["BTC/USD"],
                                           "snapshot": False}, "req_id": 3},
        {"method": "subscribe", "params": {"channel": "ohlc", "symbol": ["BTC/USD"],
                                           "interval": 5, "snapshot": True}, "req_id": 4},
    ]
    assert all(t.state(k) is SubState.REQUESTED for k in t.keys())


def test_symbols_are_batched_per_channel_and_interval() -> None:
    t = table(batch=25)
    syms = [f"P{i:03d}/USD" for i in range(60)]
    t.add(books(*syms) + [SubKey(OHLC, s, 1) for s in syms[:3]]
          + [SubKey(OHLC, s, 60) for s in syms[:3]])
    sizes = []
    while (r := t.pop_request(T0)) is not None:
        params = json.loads(r.text)["params"]
        sizes.append((params["channel"], params.get("interval"), len(params["symbol"])))
        assert len({k.channel for k in r.keys}) == 1 and len({k.interval for k in r.keys}) == 1
    assert sizes == [("book", None, 25), ("book", None, 25), ("book", None, 10),
                     ("ohlc", 1, 3), ("ohlc", 60, 3)]


def test_books_go_before_trades_and_candles_queued_earlier() -> None:
    t = table()
    t.add([SubKey(OHLC, "A/USD", 1), SubKey(TRADE, "A/USD")])
    t.add(books("A/USD") + [SubKey(INSTRUMENT)])
    assert [t.pop_request(T0).keys[0].channel for _ in range(4)] == [
        INSTRUMENT, BOOK, TRADE, OHLC]


def test_bad_keys_are_refused() -> None:
    t = table()
    with pytest.raises(ValueError):
        t.add([SubKey("ticker", "BTC/USD")])
    with pytest.raises(ValueError):
        t.add([SubKey(BOOK)])
    with pytest.raises(ValueError):
        t.add([SubKey(OHLC, "BTC/USD")])


# -- acks -----------------------------------------------------------------------------------
def test_acks_match_by_req_id_and_symbol_then_data_makes_live() -> None:
    t = table()
    t.add(books("A/USD", "B/USD"))
    r = t.pop_request(T0)
    out = feed(t, ack(r.req_id, "book", "B/USD"), T0 + S)
    assert [(o.kind, o.key) for o in out] == [(AckKind.SUBSCRIBED, SubKey(BOOK, "B/USD"))]
    assert t.state(SubKey(BOOK, "A/USD")) is SubState.REQUESTED
    assert t.in_flight == 1
    feed(t, ack(r.req_id, "book", "A/USD"))
    assert t.in_flight == 0
    assert t.on_book_data("A/USD", T0 + 2 * S, snapshot=False)  # an update is not a snapshot
    assert t.state(SubKey(BOOK, "A/USD")) is SubState.ACKED
    t.on_book_data("A/USD", T0 + 2 * S, snapshot=True)
    assert t.state(SubKey(BOOK, "A/USD")) is SubState.LIVE
    assert not t.on_book_data("Z/USD", T0, snapshot=True)  # not subscribed here


def test_the_real_ack_without_req_id_is_matched_by_name() -> None:
    t = table()
    t.add(books("MINA/GBP"))
    t.pop_request(T0)
    out = feed(t, REAL_BOOK_ACK)
    assert [(o.kind, o.key) for o in out] == [(AckKind.SUBSCRIBED, SubKey(BOOK, "MINA/GBP"))]
    assert t.in_flight == 0  # the request is answered in full


def test_a_refusal_without_symbol_refuses_its_whole_request_only() -> None:
    t = table()
    t.add(books("A/USD", "B/USD") + [SubKey(TRADE, "A/USD")])
    book_req = t.pop_request(T0)
    trade_req = t.pop_request(T0)
    out = feed(t, with_req_id(REAL_REFUSAL, book_req.req_id))
    assert {(o.kind, o.key.symbol) for o in out} == {(AckKind.REFUSED, "A/USD"),
                                                     (AckKind.REFUSED, "B/USD")}
    assert t.error(SubKey(BOOK, "A/USD")) == "Subscription depth not supported"
    assert t.state(SubKey(TRADE, "A/USD")) is SubState.REQUESTED
    feed(t, ack(trade_req.req_id, "trade", "A/USD"))
    assert t.state(SubKey(TRADE, "A/USD")) is SubState.ACKED
    assert t.settled()


def test_a_refusal_with_a_symbol_refuses_that_symbol_only() -> None:
    t = table()
    t.add([SubKey(TRADE, "XBT/USD"), SubKey(TRADE, "ETH/USD")])
    r = t.pop_request(T0)
    out = feed(t, ack(r.req_id, "trade", "XBT/USD", success=False,
                      error="Currency pair not supported XBT/USD"))
    assert [(o.kind, o.key) for o in out] == [(AckKind.REFUSED, SubKey(TRADE, "XBT/USD"))]
    assert t.state(SubKey(TRADE, "ETH/USD")) is SubState.REQUESTED


def test_already_subscribed_counts_as_success_and_repeats_are_duplicates() -> None:
    t = table()
    t.add([SubKey(TRADE, "A/USD")])
    r = t.pop_request(T0)
    out = feed(t, ack(r.req_id, "trade", "A/USD", success=False, error="Already subscribed"))
    assert out[0].kind is AckKind.SUBSCRIBED
    out = feed(t, ack(r.req_id, "trade", "A/USD"))
    assert out[0].kind is AckKind.DUPLICATE
    out = feed(t, ack(999, "trade", "Q/USD"))
    assert out[0].kind is AckKind.UNMATCHED


def test_ohlc_acks_match_by_interval() -> None:
    t = table()
    t.add([SubKey(OHLC, "A/USD", 1), SubKey(OHLC, "A/USD", 60)])
    t.pop_request(T0)
    t.pop_request(T0)
    out = feed(t, ack(None, "ohlc", "A/USD", interval=60))
    assert [o.key for o in out] == [SubKey(OHLC, "A/USD", 60)]
    assert t.state(SubKey(OHLC, "A/USD", 1)) is SubState.REQUESTED


def test_instrument_ack_has_no_symbol() -> None:
    t = table()
    t.add([SubKey(INSTRUMENT)])
    r = t.pop_request(T0)
    out = feed(t, ack(r.req_id, "instrument", None))
    assert [(o.kind, o.key) for o in out] == [(AckKind.SUBSCRIBED, SubKey(INSTRUMENT))]
    t.on_data(SubKey(INSTRUMENT), T0, snapshot=False)  # an update does not make it live
    assert t.state(SubKey(INSTRUMENT)) is SubState.ACKED
    t.on_data(SubKey(INSTRUMENT), T0, snapshot=True)
    assert t.state(SubKey(INSTRUMENT)) is SubState.LIVE


# -- resubscribe ------------------------------------------------------------------------------
def live_books(t: SubscriptionTable, *symbols: str) -> None:
    t.add(books(*symbols))
    while (r := t.pop_request(T0)) is not None:
        for k in r.keys:
            feed(t, ack(r.req_id, "book", k.symbol))
            t.on_book_data(k.symbol, T0, snapshot=True)


def test_resubscribe_is_unsubscribe_ack_subscribe_for_that_key_only() -> None:
    t = table()
    live_books(t, "A/USD", "B/USD")
    assert t.resubscribe(SubKey(BOOK, "A/USD"))
    assert not t.resubscribe(SubKey(BOOK, "A/USD"))  # already on its way
    r = t.pop_request(T0)
    assert json.loads(r.text) == {"method": "unsubscribe", "req_id": r.req_id,
                                  "params": {"channel": "book", "symbol": ["A/USD"],
                                             "depth": 25}}
    out = feed(t, ack(r.req_id, "book", "A/USD", method="unsubscribe"))
    assert out[0].kind is AckKind.UNSUBSCRIBED
    r2 = t.pop_request(T0)
    assert json.loads(r2.text)["method"] == "subscribe"
    assert [k.symbol for k in r2.keys] == ["A/USD"]
    assert t.state(SubKey(BOOK, "B/USD")) is SubState.LIVE


def test_the_real_unsubscribe_ack_and_a_not_found_refusal_both_resubscribe() -> None:
    t = table()
    live_books(t, "MINA/GBP", "B/USD")
    t.resubscribe(SubKey(BOOK, "MINA/GBP"))
    t.resubscribe(SubKey(BOOK, "B/USD"))
    r = t.pop_request(T0)
    assert feed(t, REAL_UNSUB_ACK)[0].kind is AckKind.UNSUBSCRIBED
    out = feed(t, ack(r.req_id, "book", "B/USD", method="unsubscribe", success=False,
                      error="Subscription Not Found"))
    assert out[0].kind is AckKind.UNSUBSCRIBED
    assert t.state(SubKey(BOOK, "B/USD")) is SubState.PENDING


# -- rate limit and ack timeout -----------------------------------------------------------------
def test_rate_limit_requeues_unacked_keys_first_and_late_acks_still_match() -> None:
    t = table(batch=1)
    t.add(books("A/USD", "B/USD", "C/USD", "D/USD"))
    ra, rb, rc = (t.pop_request(T0) for _ in range(3))
    feed(t, ack(ra.req_id, "book", "A/USD"))
    requeued = t.requeue_unacked()
    assert requeued == [SubKey(BOOK, "B/USD"), SubKey(BOOK, "C/USD")]
    # B and C go out again before D, which was never sent.
    assert t.pop_request(T0).keys == (SubKey(BOOK, "B/USD"),)
    # The first B request did get through after all: its late ack settles B...
    assert feed(t, ack(rb.req_id, "book", "B/USD"))[0].kind is AckKind.SUBSCRIBED
    # ...and also C, still queued, which is then not sent again.
    assert feed(t, ack(rc.req_id, "book", "C/USD"))[0].kind is AckKind.SUBSCRIBED
    assert t.pop_request(T0).keys == (SubKey(BOOK, "D/USD"),)
    assert feed(t, ack(None, "book", "B/USD", success=False,
                       error="Already subscribed"))[0].kind is AckKind.DUPLICATE


def test_requests_without_ack_expire_and_are_requeued() -> None:
    t = table()
    t.add(books("A/USD"))
    r = t.pop_request(T0)
    assert t.take_new_deadline() == T0 + 10 * S
    assert t.expire(T0 + 9 * S) == []
    assert t.expire(T0 + 10 * S) == [SubKey(BOOK, "A/USD")]
    assert t.state(SubKey(BOOK, "A/USD")) is SubState.PENDING and t.in_flight == 0
    r2 = t.pop_request(T0 + 10 * S)
    assert r2.req_id > r.req_id


def test_a_snapshot_while_requested_means_subscribed() -> None:
    t = table()
    t.add(books("A/USD"))
    t.pop_request(T0)
    t.on_book_data("A/USD", T0 + S, snapshot=True)
    assert t.state(SubKey(BOOK, "A/USD")) is SubState.LIVE and t.in_flight == 0


# -- liveness -----------------------------------------------------------------------------------
def test_missing_snapshot_and_silence_are_found_and_trades_never() -> None:
    t = table()
    t.add(books("A/USD", "B/USD") + [SubKey(TRADE, "A/USD")])
    while (r := t.pop_request(T0)) is not None:
        for k in r.keys:
            feed(t, ack(r.req_id, k.channel, k.symbol), T0)
    t.on_book_data("B/USD", T0 + S, snapshot=True)
    assert t.next_deadline() == T0 + 10 * S  # A's snapshot deadline
    assert t.check_liveness(T0 + 9 * S) == []
    found = t.check_liveness(T0 + 10 * S)
    assert [(f.key, f.reason) for f in found] == [
        (SubKey(BOOK, "A/USD"), "no snapshot within 10 s of the ack")]
    found = t.check_liveness(T0 + 61 * S)
    assert {f.key.symbol for f in found if f.reason.startswith("silent")} == {"B/USD"}
    assert all(f.key.channel == BOOK for f in found)


def test_each_miss_doubles_the_snapshot_timeout_until_data_arrives() -> None:
    t = table()
    live_books(t, "A/USD")
    key = SubKey(BOOK, "A/USD")
    now = T0
    for waited in (10, 20, 40, 80):
        assert t.resubscribe(key, missed=True)
        r = t.pop_request(now)
        feed(t, ack(r.req_id, "book", "A/USD", method="unsubscribe"), now)
        r = t.pop_request(now)
        feed(t, ack(r.req_id, "book", "A/USD"), now)
        assert t.check_liveness(now + (waited - 1) * S) == []
        assert t.check_liveness(now + waited * S)[0].key == key
        now += waited * S
    t.on_book_data("A/USD", now, snapshot=True)  # data resets the doubling
    t.resubscribe(key, missed=True)  # say it went silent later
    for method in ("unsubscribe", "subscribe"):
        r = t.pop_request(now)
        feed(t, ack(r.req_id, "book", "A/USD", method=method), now)
    assert t.check_liveness(now + 10 * S)[0].reason == "no snapshot within 10 s of the ack"


# -- pacer ------------------------------------------------------------------------------------
def test_pacer_spaces_requests_evenly_and_holds() -> None:
    p = Pacer(10.0)
    assert p.interval_ns == 100_000_000
    assert p.try_take(T0) and not p.try_take(T0)
    assert p.ready_at() == T0 + 100_000_000
    assert p.try_take(T0 + 100_000_000)
    p.hold(T0 + 5 * S)
    assert not p.try_take(T0 + 4 * S) and p.ready_at() == T0 + 5 * S
    assert p.try_take(T0 + 5 * S)
    p.reset()
    assert p.try_take(T0)


def test_pacer_burst() -> None:
    p = Pacer(10.0, burst=3)
    assert [p.try_take(T0) for _ in range(4)] == [True, True, True, False]


@given(rate=st.sampled_from([1.0, 3.0, 7.5, 10.0, 20.0]),
       gaps=st.lists(st.integers(0, 400_000_000), min_size=1, max_size=200))
def test_pacer_never_exceeds_its_rate_in_any_one_second_window(rate: float,
                                                               gaps: list[int]) -> None:
    p = Pacer(rate)
    now, sent = T0, []
    for g in gaps:
        now += g
        while p.try_take(now):
            sent.append(now)
    for i, t in enumerate(sent):  # requests in [t, t + 1 s)
        assert sum(1 for u in sent[i:] if u < t + S) <= rate
