"""ingest.normalize: trades, candles (close on the next interval), status, pair status."""

from __future__ import annotations

import json

from bus.schema import (
    MarketDataOHLCVEvent,
    MarketDataTradeEvent,
    SystemStateEvent,
    decode_envelope_json,
    encode_envelope_json,
    make_envelope,
)
from ingest.normalize import CandleCloser, PairStatus, status_events, trade_events
from ingest.wire import decode_message

RECV = 1_787_000_000_000_000_000

# Kraken docs (PROTOCOL.md 2.4 and 2.5), verbatim apart from whitespace.
DOCS_TRADE = (b'{"channel":"trade","type":"update","data":[{"symbol":"MATIC/USD","side":"sell",'
              b'"price":0.5117,"qty":40.0,"ord_type":"market","trade_id":4665906,'
              b'"timestamp":"2023-09-25T07:49:37.708706Z"}]}')
DOCS_OHLC = (b'{"channel":"ohlc","type":"update","timestamp":"2023-10-04T16:26:30.524394914Z",'
             b'"data":[{"symbol":"MATIC/USD","open":0.5624,"high":0.5628,"low":0.5622,'
             b'"close":0.5627,"trades":12,"volume":30927.68066226,"vwap":0.5626,'
             b'"interval_begin":"2023-10-04T16:25:00.000000000Z","interval":5,'
             b'"timestamp":"2023-10-04T16:30:00.000000Z"}]}')
# Real, 2026-08-16 (PROTOCOL.md 2.1).
REAL_STATUS = (b'{"channel":"status","type":"update","data":[{"version":"2.0.10",'
               b'"system":"online","api_version":"v2","connection_id":15113583034416118705}]}')


def candle(begin: str, close: str, *, symbol: str = "MATIC/USD", interval: int = 5,
           trades: int = 1) -> dict:
    return {"symbol": symbol, "open": 0.5624, "high": 0.5628, "low": 0.5622,
            "close": close, "trades": trades, "volume": 1.5, "vwap": 0.5626,
            "interval_begin": begin, "interval": interval}


def ohlc_frame(*candles: dict, type_: str = "update") -> bytes:
    # `close` is spliced in as a bare number token, as Kraken sends it.
    body = json.dumps({"channel": "ohlc", "type": type_, "data": list(candles)})
    for c in candles:
        body = body.replace(f'"close": "{c["close"]}"', f'"close": {c["close"]}', 1)
    return body.encode()


def closes(events: list[MarketDataOHLCVEvent]) -> list[tuple[str, str, bool]]:
    return [(e.timestamp[11:16], e.close, e.closed) for e in events]


def test_docs_trade_becomes_one_event_with_exact_decimals() -> None:
    [e] = trade_events(decode_message(DOCS_TRADE), RECV)
    assert e == MarketDataTradeEvent(pair="MATIC/USD", trade_id=4665906, side="sell",
                                     price="0.5117", qty="40.0", ord_type="market",
                                     timestamp="2023-09-25T07:49:37.708706Z", recv_ns=RECV)
    assert e.source == "kraken_ws_v2"


def test_batched_trades_each_become_an_event_and_bad_sides_are_left_out() -> None:
    frame = DOCS_TRADE.replace(b"]}", b',{"symbol":"MATIC/USD","side":"buy","price":0.5118,'
                                      b'"qty":1.00000000,"ord_type":"limit","trade_id":4665907,'
                                      b'"timestamp":"2023-09-25T07:49:37.708800Z"},'
                                      b'{"symbol":"MATIC/USD","side":"b","price":1,"qty":1,'
                                      b'"ord_type":"limit","trade_id":4665908,'
                                      b'"timestamp":"2023-09-25T07:49:37.708900Z"}]}')
    events = trade_events(decode_message(frame), RECV)
    assert [(e.trade_id, e.side, e.qty) for e in events] == [
        (4665906, "sell", "40.0"), (4665907, "buy", "1.00000000")]


def test_docs_candle_is_an_open_candle() -> None:
    [e] = CandleCloser().on_ohlc(decode_message(DOCS_OHLC), RECV)
    assert e == MarketDataOHLCVEvent(
        pair="MATIC/USD", interval="5m", timestamp="2023-10-04T16:25:00.000000000Z",
        open="0.5624", high="0.5628", low="0.5622", close="0.5627", volume="30927.68066226",
        vwap="0.5626", count=12, closed=False, recv_ns=RECV)


def test_a_candle_closes_when_the_next_interval_begins_not_on_a_clock() -> None:
    cc = CandleCloser()
    out = []
    for begin, close in (("16:25", "0.5627"), ("16:25", "0.5630"), ("16:25", "0.5631"),
                         ("16:30", "0.5640"), ("16:30", "0.5641"), ("16:40", "0.5650")):
        frame = ohlc_frame(candle(f"2023-10-04T{begin}:00.000000000Z", close))
        out.append(closes(cc.on_ohlc(decode_message(frame), RECV)))
    assert out == [
        [("16:25", "0.5627", False)],
        [("16:25", "0.5630", False)],
        [("16:25", "0.5631", False)],
        [("16:25", "0.5631", True), ("16:30", "0.5640", False)],  # last update, once more
        [("16:30", "0.5641", False)],
        [("16:30", "0.5641", True), ("16:40", "0.5650", False)],  # a gap: no empty candle
    ]


def test_pairs_and_intervals_close_independently() -> None:
    cc = CandleCloser()
    first = ohlc_frame(candle("2023-10-04T16:25:00Z", "1.0"),
                       candle("2023-10-04T16:25:00Z", "2.0", symbol="BTC/USD"),
                       candle("2023-10-04T16:00:00Z", "3.0", interval=60))
    cc.on_ohlc(decode_message(first), RECV)
    later = ohlc_frame(candle("2023-10-04T16:30:00Z", "1.1"))
    events = cc.on_ohlc(decode_message(later), RECV)
    assert [(e.pair, e.interval, e.close, e.closed) for e in events] == [
        ("MATIC/USD", "5m", "1.0", True), ("MATIC/USD", "5m", "1.1", False)]


def test_snapshot_history_is_final_once_and_a_reconnect_repeats_nothing() -> None:
    cc = CandleCloser()
    snap = ohlc_frame(candle("2023-10-04T16:30:00Z", "3.0"), candle("2023-10-04T16:20:00Z", "1.0"),
                      candle("2023-10-04T16:25:00Z", "2.0"), type_="snapshot")
    assert closes(cc.on_ohlc(decode_message(snap), RECV)) == [
        ("16:20", "1.0", True), ("16:25", "2.0", True), ("16:30", "3.0", False)]
    # Reconnect: the new snapshot holds the final 16:30 candle and a running 16:35.
    snap2 = ohlc_frame(candle("2023-10-04T16:25:00Z", "2.0"), candle("2023-10-04T16:30:00Z", "3.5"),
                       candle("2023-10-04T16:35:00Z", "4.0"), type_="snapshot")
    assert closes(cc.on_ohlc(decode_message(snap2), RECV)) == [
        ("16:30", "3.5", True), ("16:35", "4.0", False)]
    # A stale update of an already closed interval is dropped.
    old = ohlc_frame(candle("2023-10-04T16:30:00Z", "9.9"))
    assert cc.on_ohlc(decode_message(old), RECV) == []
    assert cc.dropped == 1


def test_a_snapshot_after_a_long_gap_closes_the_running_candle_first() -> None:
    cc = CandleCloser()
    cc.on_ohlc(decode_message(ohlc_frame(candle("2023-10-04T16:25:00Z", "1.0"))), RECV)
    snap = ohlc_frame(candle("2023-10-04T17:00:00Z", "5.0"), candle("2023-10-04T17:05:00Z", "6.0"),
                      type_="snapshot")
    assert closes(cc.on_ohlc(decode_message(snap), RECV)) == [
        ("16:25", "1.0", True), ("17:00", "5.0", True), ("17:05", "6.0", False)]


def test_real_status_frame_is_the_engine_state() -> None:
    [e] = status_events(decode_message(REAL_STATUS), RECV)
    assert (e.status_code, e.pair, e.service_name) == ("online", None, "ingest")
    assert "15113583034416118705" in e.status_message  # > 2**53, kept exact
    assert e.timestamp == "2026-08-17T20:53:20.000000000Z"


def instrument(*pairs: tuple[str, str]) -> bytes:
    objs = [{"symbol": s, "base": s.split("/")[0], "quote": s.split("/")[1], "status": st,
             "qty_precision": 8, "qty_increment": 1e-08, "price_precision": 1,
             "price_increment": 0.1} for s, st in pairs]
    return json.dumps({"channel": "instrument", "type": "update",
                       "data": {"assets": [], "pairs": objs}}).encode()


def test_pair_status_changes_of_configured_pairs_only() -> None:
    ps = PairStatus(["BTC/USD", "ETH/USD"])
    first = ps.update(decode_message(instrument(("BTC/USD", "online"), ("DOGE/USD", "online")))
                      .pairs, RECV)
    assert [(e.pair, e.status_code) for e in first] == [("BTC/USD", "online")]
    assert ps.update(decode_message(instrument(("BTC/USD", "online"))).pairs, RECV) == []
    [e] = ps.update(decode_message(instrument(("BTC/USD", "cancel_only"))).pairs, RECV)
    assert (e.pair, e.status_code, e.status_message) == (
        "BTC/USD", "cancel_only", "BTC/USD trading status online -> cancel_only")


def test_events_survive_the_bus_envelope() -> None:
    events = [*trade_events(decode_message(DOCS_TRADE), RECV),
              *CandleCloser().on_ohlc(decode_message(DOCS_OHLC), RECV),
              *status_events(decode_message(REAL_STATUS), RECV)]
    for e in events:
        env = make_envelope(e, epoch=1, seq=1, pub_ns=RECV)
        _, back = decode_envelope_json(encode_envelope_json(env))
        assert back == e
    assert isinstance(events[-1], SystemStateEvent)
