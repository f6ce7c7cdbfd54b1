"""Kraken wire messages -> bus events (bus/schema.py). Pure: values in, events out.

=========================  =============================================================
wire message               bus events
=========================  =============================================================
`TradeMessage`             one `MarketDataTradeEvent` per trade (Kraken batches them)
`OhlcMessage`              `MarketDataOHLCVEvent` with ``closed: false`` for every candle
                           update; when the first update of a *later* ``interval_begin``
                           arrives for the same (pair, interval), the previous candle goes
                           out once more with ``closed: true`` (`CandleCloser`; never on
                           a clock: Kraken sends no close flag)
`Status`                   `SystemStateEvent`, Kraken's engine state (``online``,
                           ``maintenance``, ``cancel_only``, ``post_only``), pair null
`InstrumentMessage`        `SystemStateEvent` with ``pair`` set when a configured pair's
                           trading status changes (`PairStatus`)
=========================  =============================================================

plus `system_event` and `halt_trigger` for ingest's own states and triggers.

Numbers stay the exact decimal strings `ingest.wire` produced from the number tokens.
Timestamps: trade and candle events carry Kraken's own; the events ingest originates
carry ``now_ns`` (unix ns) in RFC3339.

Candles in a snapshot: Kraken may send several candles of one (pair, interval) in a
snapshot. All but the newest are final, so they go out once, with ``closed: true``; the
newest is the running candle (``closed: false``). A candle at or before the last one
already published closed is not published again, so a reconnect snapshot repeats no
history.
"""

from __future__ import annotations

from collections.abc import Iterable

from bus.schema import (
    MarketDataOHLCVEvent,
    MarketDataTradeEvent,
    PotentialHaltTriggerEvent,
    SchemaError,
    SystemStateEvent,
    ns_to_rfc3339,
    rfc3339_to_ns,
)
from ingest.config import MINUTES_INTERVAL
from ingest.wire import Candle, InstrumentPair, OhlcMessage, Status, TradeMessage

__all__ = ["SERVICE", "SOURCE_MODULE", "system_event", "halt_trigger", "status_events",
           "trade_events", "CandleCloser", "PairStatus"]

SERVICE = "ingest"  # SystemStateEvent.service_name
SOURCE_MODULE = "ingest"  # PotentialHaltTriggerEvent.source_module
_SIDES = ("buy", "sell")


def system_event(now_ns: int, status_code: str, message: str,
                 pair: str | None = None) -> SystemStateEvent:
    return SystemStateEvent(timestamp=ns_to_rfc3339(now_ns), service_name=SERVICE,
                            status_code=status_code, status_message=message, pair=pair)


def halt_trigger(now_ns: int, error_code: str, reason: str, details: str,
                 pair: str | None = None) -> PotentialHaltTriggerEvent:
    return PotentialHaltTriggerEvent(timestamp=ns_to_rfc3339(now_ns),
                                     source_module=SOURCE_MODULE, error_code=error_code,
                                     reason=reason, details=details, pair=pair)


def status_events(msg: Status, now_ns: int) -> list[SystemStateEvent]:
    """Kraken's engine state (sent on connect and on every change)."""
    return [system_event(now_ns, d.system,
                         f"Kraken engine {d.system} (api {d.api_version or '?'}, "
                         f"version {d.version or '?'}, connection_id {d.connection_id})")
            for d in msg.data]


def trade_events(msg: TradeMessage, recv_ns: int) -> list[MarketDataTradeEvent]:
    """One event per trade. A trade whose side is not buy/sell or whose trade_id is
    negative breaks the published schema and is left out (the caller counts
    ``len(msg.data) - len(result)``)."""
    return [MarketDataTradeEvent(pair=t.symbol, trade_id=t.trade_id, side=t.side,
                                 price=t.price, qty=t.qty, ord_type=t.ord_type,
                                 timestamp=t.timestamp, recv_ns=recv_ns)
            for t in msg.data if t.side in _SIDES and t.trade_id >= 0]


def _candle_event(c: Candle, interval: str, closed: bool, recv_ns: int) -> MarketDataOHLCVEvent:
    return MarketDataOHLCVEvent(pair=c.symbol, interval=interval, timestamp=c.interval_begin,
                                open=c.open, high=c.high, low=c.low, close=c.close,
                                volume=c.volume, vwap=c.vwap, count=c.trades, closed=closed,
                                recv_ns=recv_ns)


class CandleCloser:
    """Candle updates -> events, with the close detected by the next interval's start.

    State per (pair, Kraken minutes): the running candle and the ``interval_begin`` of
    the last candle published closed. Keep one instance for the life of the process
    (across reconnects), so a candle is closed exactly once.
    """

    def __init__(self) -> None:
        self._open: dict[tuple[str, int], tuple[int, Candle]] = {}
        self._closed_begin: dict[tuple[str, int], int] = {}
        self.dropped = 0  # candles left out: unknown interval, bad timestamp, out of order

    def on_ohlc(self, msg: OhlcMessage, recv_ns: int) -> list[MarketDataOHLCVEvent]:
        out: list[MarketDataOHLCVEvent] = []
        parsed: list[tuple[int, Candle]] = []
        for c in msg.data:
            if c.interval not in MINUTES_INTERVAL:
                self.dropped += 1
                continue
            try:
                parsed.append((rfc3339_to_ns(c.interval_begin), c))
            except SchemaError:
                self.dropped += 1
        if msg.type == "snapshot":
            parsed.sort(key=lambda bc: bc[0])  # stable: same-begin candles keep their order
            newest: dict[tuple[str, int], int] = {}
            for begin, c in parsed:
                k = (c.symbol, c.interval)
                newest[k] = max(begin, newest.get(k, begin))
            for begin, c in parsed:
                if begin < newest[(c.symbol, c.interval)]:
                    self._final(begin, c, recv_ns, out)
                else:
                    self._update(begin, c, recv_ns, out)
        else:
            for begin, c in parsed:
                self._update(begin, c, recv_ns, out)
        return out

    def _update(self, begin: int, c: Candle, recv_ns: int,
                out: list[MarketDataOHLCVEvent]) -> None:
        k = (c.symbol, c.interval)
        closed = self._closed_begin.get(k)
        if closed is not None and begin <= closed:
            self.dropped += 1  # that candle is already final
            return
        cur = self._open.get(k)
        if cur is not None:
            if begin < cur[0]:
                self.dropped += 1  # older than the running candle: out of order
                return
            if begin > cur[0]:  # a later interval began: the running candle is final
                out.append(_candle_event(cur[1], MINUTES_INTERVAL[c.interval], True, recv_ns))
                self._closed_begin[k] = cur[0]
        self._open[k] = (begin, c)
        out.append(_candle_event(c, MINUTES_INTERVAL[c.interval], False, recv_ns))

    def _final(self, begin: int, c: Candle, recv_ns: int,
               out: list[MarketDataOHLCVEvent]) -> None:
        """A snapshot candle with a later one behind it: final, published once."""
        k = (c.symbol, c.interval)
        closed = self._closed_begin.get(k)
        if closed is not None and begin <= closed:
            return
        cur = self._open.get(k)
        if cur is not None and cur[0] < begin:  # our running candle ended before this one
            out.append(_candle_event(cur[1], MINUTES_INTERVAL[c.interval], True, recv_ns))
        if cur is not None and cur[0] <= begin:
            del self._open[k]
        if cur is not None and cur[0] > begin:
            return  # older than what is running: already superseded
        out.append(_candle_event(c, MINUTES_INTERVAL[c.interval], True, recv_ns))
        self._closed_begin[k] = begin


class PairStatus:
    """Per-pair trading status of the configured pairs, from the instrument channel.

    `update` returns one `SystemStateEvent` (pair set, status_code = Kraken's status)
    for every configured pair whose status differs from the last one seen, including
    the first time a pair is seen. Keep one instance across reconnects: the snapshot of
    a new connection repeats nothing that did not change.
    """

    def __init__(self, pairs: Iterable[str]) -> None:
        self._pairs = frozenset(pairs)
        self.status: dict[str, str] = {}

    def update(self, pairs: Iterable[InstrumentPair], now_ns: int) -> list[SystemStateEvent]:
        out: list[SystemStateEvent] = []
        for p in pairs:
            if p.symbol not in self._pairs:
                continue
            before = self.status.get(p.symbol)
            if before == p.status:
                continue
            self.status[p.symbol] = p.status
            what = (f"trading status {p.status}" if before is None
                    else f"trading status {before} -> {p.status}")
            out.append(system_event(now_ns, p.status, f"{p.symbol} {what}", pair=p.symbol))
        return out
