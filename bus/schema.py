"""The cross-process event contract: what every bus subscriber, in any language, relies on.

Events
    Every event is a frozen msgspec Struct below (the seed's names and fields, plus
    what a consumer needs). Prices, quantities and volumes are **decimal strings**
    (``"62807.0"``, ``"0.00005100"``) spelled at the instrument's precision, never
    floats. ``timestamp`` keeps the seed's meaning (an RFC3339 string from Kraken where
    Kraken sent one); integer nanosecond fields (``recv_ns``, ``exchange_ts_ns``,
    ``pub_ns``) are unix nanoseconds. Unknown fields are ignored on decode, so adding an
    optional field is not a breaking change; ``SCHEMA_VERSION`` changes only when an
    existing field changes meaning or type.

Wire format (DESIGN.md section 3)
    One ZMQ frame: ``topic + b" " + payload``. Topics never contain spaces:
    ``book.<PAIR>``, ``trade.<PAIR>``, ``ohlc.<interval>.<PAIR>``, ``system``,
    ``trigger``, ``halt``, ``stats``. Subscribing to ``subscription_prefix("book.BTC/USD")``
    (``b"book.BTC/USD "``, trailing space included) gets that pair and never BTC/USDT.
    The payload is an ``Envelope``: ``{"v", "topic", "epoch", "seq", "pub_ns", "type",
    "event"}``. ``seq`` counts per topic from 1 within an ``epoch``; the epoch changes
    whenever the bus restarts, so a jump in ``seq`` within one epoch is loss.

Two encodings
    JSON carries every event as defined here. msgpack carries the same envelopes, except
    that a book travels as ``MarketDataL2EventTicks``: levels are ``[price_ticks,
    qty_ticks]`` uint64 plus ``price_precision``/``qty_precision``. ``decimal_to_ticks``
    and ``ticks_to_decimal`` convert exactly (string and integer arithmetic, no float).

This module is pure: no I/O, no clock, no sockets. Encoders and decoders are built once
at import. ``python -m bus.schema --json-schema`` prints the generated JSON Schemas.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Generic, Literal, TypeVar

import msgspec

SCHEMA_VERSION = 1
SOURCE = "kraken_ws_v2"
U64_MAX = 2**64 - 1
U32_MAX = 2**32 - 1

# OHLC interval names as used in topics and events (Kraken minutes in parentheses):
# 1m (1), 5m (5), 15m (15), 30m (30), 1h (60), 4h (240), 1d (1440), 1w (10080), 15d (21600).
OHLC_INTERVALS = ("1m", "5m", "15m", "30m", "1h", "4h", "1d", "1w", "15d")

# --- SystemStateEvent.status_code vocabulary -------------------------------------------
# Our connection states (service_name is the reporting process, e.g. "ingest").
CONNECTED = "CONNECTED"
DISCONNECTED = "DISCONNECTED"
RECONNECTING = "RECONNECTING"
ERROR = "ERROR"
STALE = "STALE"  # with pair set: that subscription went silent past its limit
CONNECTION_STATES = (CONNECTED, DISCONNECTED, RECONNECTING, ERROR, STALE)
# Book state changes reported by bookd (pair always set).
RESYNCING = "RESYNCING"  # mismatch or gap: events withheld until a fresh snapshot
VALID = "VALID"  # checksum verified again
HALTED = "HALTED"  # the halt authority stopped the system, or the pair is unrepresentable
INTEGRITY = "INTEGRITY"  # a value of this pair does not fit uint64 ticks (message names it)
BOOK_STATES = (RESYNCING, VALID, HALTED, INTEGRITY)
# Kraken's engine state from the `status` channel (pair is null, codes are Kraken's).
ENGINE_STATES = ("online", "maintenance", "cancel_only", "post_only")
# Kraken's per-pair trading status from the `instrument` channel (pair is set).
INSTRUMENT_STATES = ("online", "cancel_only", "post_only", "limit_only", "reduce_only",
                     "maintenance", "delisted", "work_in_progress")
STATUS_CODES = frozenset(CONNECTION_STATES + BOOK_STATES + ENGINE_STATES + INSTRUMENT_STATES)

# --- Topics -----------------------------------------------------------------------------
SYSTEM_TOPIC = "system"
TRIGGER_TOPIC = "trigger"
HALT_TOPIC = "halt"
STATS_TOPIC = "stats"

# --- Field types ------------------------------------------------------------------------
_DECIMAL_PATTERN = r"^[0-9]+(\.[0-9]+)?$"
# The pattern is published in the JSON Schema but not checked on decode: a regex per
# level makes book decoding ~12x slower. decimal_to_ticks() validates strictly.
DecimalStr = Annotated[str, msgspec.Meta(
    description="Exact non-negative decimal, digits as the exchange printed them",
    extra_json_schema={"pattern": _DECIMAL_PATTERN}, examples=["62807.0", "0.00005100"])]
Rfc3339 = Annotated[str, msgspec.Meta(
    description="RFC3339 UTC time, e.g. 2026-08-16T23:37:03.745044Z",
    extra_json_schema={"format": "date-time"})]
# msgspec cannot check bounds past int64, so the uint64 maximum is published, not enforced
# on decode (msgpack cannot carry more anyway; l2_to_ticks checks before encoding).
_U64_SCHEMA = {"maximum": U64_MAX}
UnixNs = Annotated[int, msgspec.Meta(ge=0, description="Unix time, nanoseconds",
                                     extra_json_schema=_U64_SCHEMA)]
U64 = Annotated[int, msgspec.Meta(ge=0, extra_json_schema=_U64_SCHEMA)]
Precision = Annotated[int, msgspec.Meta(ge=0, le=18, description="Decimals after the point")]
Level = tuple[DecimalStr, DecimalStr]
TickLevel = tuple[U64, U64]


class SchemaError(ValueError):
    """A payload or value that does not follow this contract."""


class TickOverflowError(SchemaError):
    """A value whose ticks do not fit uint64 (an integrity error for that pair)."""


class _Event(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    pass


class MarketDataL2Event(_Event, kw_only=True):
    """A checksum-validated L2 book after one exchange message (topic book.<PAIR>)."""

    pair: str
    timestamp: Rfc3339 | None  # exchange time of the last book change; null if Kraken omitted it
    source: str = SOURCE
    bids: list[Level]  # best (highest) first
    asks: list[Level]  # best (lowest) first
    checksum: Annotated[int, msgspec.Meta(ge=0, le=U32_MAX)]  # Kraken's CRC32, verified
    conn_id: U64  # ingest's connection id; changes on every reconnect
    exchange_ts_ns: UnixNs | None  # `timestamp` as unix ns, null when timestamp is null
    recv_ns: UnixNs  # when ingest received the frame
    snapshot: bool  # the frame was a snapshot (first, or a resync)
    depth: Annotated[int, msgspec.Meta(ge=1)]  # subscribed depth
    price_precision: Precision  # decimals of every price (Kraken's instrument channel)
    qty_precision: Precision  # decimals of every qty


class MarketDataL2EventTicks(_Event, kw_only=True):
    """MarketDataL2Event as carried in msgpack: levels are [price_ticks, qty_ticks]."""

    pair: str
    timestamp: Rfc3339 | None
    source: str = SOURCE
    bids: list[TickLevel]
    asks: list[TickLevel]
    price_precision: Precision
    qty_precision: Precision
    checksum: Annotated[int, msgspec.Meta(ge=0, le=U32_MAX)]
    conn_id: U64
    exchange_ts_ns: UnixNs | None
    recv_ns: UnixNs
    snapshot: bool
    depth: Annotated[int, msgspec.Meta(ge=1)]


class MarketDataTradeEvent(_Event, kw_only=True):
    """One trade (topic trade.<PAIR>); Kraken batches several per message."""

    pair: str
    trade_id: U64  # Kraken's sequence number, unique per book
    side: Literal["buy", "sell"]  # the taker's side
    price: DecimalStr
    qty: DecimalStr
    ord_type: str  # the taker order type: "limit" or "market"
    timestamp: Rfc3339
    source: str = SOURCE
    recv_ns: UnixNs


class MarketDataOHLCVEvent(_Event, kw_only=True):
    """A candle (topic ohlc.<interval>.<PAIR>); published once more with closed=true."""

    pair: str
    interval: str  # one of OHLC_INTERVALS
    timestamp: Rfc3339  # the candle's interval_begin
    open: DecimalStr
    high: DecimalStr
    low: DecimalStr
    close: DecimalStr
    volume: DecimalStr  # base currency
    vwap: DecimalStr
    count: Annotated[int, msgspec.Meta(ge=0)]  # number of trades
    source: str = SOURCE
    closed: bool  # final: a later interval of the same pair has begun
    recv_ns: UnixNs


class SystemStateEvent(_Event, kw_only=True):
    """A state change (topic system); status_code is one of STATUS_CODES."""

    timestamp: Rfc3339  # when our process saw it
    service_name: str  # the reporting process: ingest, bookd, bus, haltd
    status_code: str
    status_message: str
    pair: str | None = None  # null for system-wide states


class PotentialHaltTriggerEvent(_Event, kw_only=True):
    """A critical condition that may warrant a system halt (topic trigger)."""

    timestamp: Rfc3339
    source_module: str
    error_code: str
    reason: str
    details: str
    pair: str | None = None


class StatsEvent(_Event, kw_only=True):
    """Per-process counters (monotonic) and gauges (instantaneous), every few seconds."""

    timestamp: Rfc3339
    process: str
    pid: Annotated[int, msgspec.Meta(ge=0)]
    counters: dict[str, int]  # frames, decode_errors, mismatches, resyncs, reconnects, drops
    gauges: dict[str, float]  # queue depths, lag


class HaltTrigger(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """One trigger that contributed to a HaltDecision."""

    source: str  # source_module of a trigger event, or the supervisord program
    error_code: str
    reason: str
    pair: str | None = None
    at: Rfc3339


class HaltDecision(_Event, kw_only=True):
    """The latched halt (topic halt): why, from which triggers, and what was stopped."""

    timestamp: Rfc3339
    reason: str
    triggers: list[HaltTrigger]
    stopped: list[str]  # supervisord program names, in stop order


E = TypeVar("E")


class Envelope(msgspec.Struct, Generic[E], frozen=True, kw_only=True,
               forbid_unknown_fields=False):
    """The bus payload around every event."""

    v: int  # SCHEMA_VERSION
    topic: str
    epoch: U64  # changes whenever the bus restarts
    seq: Annotated[int, msgspec.Meta(ge=1)]  # per topic, from 1 within an epoch
    pub_ns: UnixNs  # when the bus published it
    type: str  # the event's class name, a key of EVENT_TYPES
    event: E


Event = (MarketDataL2Event | MarketDataL2EventTicks | MarketDataTradeEvent
         | MarketDataOHLCVEvent | SystemStateEvent | PotentialHaltTriggerEvent | StatsEvent
         | HaltDecision)
EVENT_TYPES: dict[str, type] = {cls.__name__: cls for cls in (
    MarketDataL2Event, MarketDataL2EventTicks, MarketDataTradeEvent, MarketDataOHLCVEvent,
    SystemStateEvent, PotentialHaltTriggerEvent, StatsEvent, HaltDecision)}


# --- Topics and frames ------------------------------------------------------------------
def _name(value: str, what: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise SchemaError(f"{what} {value!r} must be non-empty and contain no whitespace")
    return value


def book_topic(pair: str) -> str:
    return "book." + _name(pair, "pair")


def trade_topic(pair: str) -> str:
    return "trade." + _name(pair, "pair")


def ohlc_topic(interval: str, pair: str) -> str:
    if interval not in OHLC_INTERVALS:
        raise SchemaError(f"interval {interval!r} not one of {', '.join(OHLC_INTERVALS)}")
    return f"ohlc.{interval}.{_name(pair, 'pair')}"


_TOPIC_OF: dict[type, Callable[[Any], str]] = {
    MarketDataL2Event: lambda e: book_topic(e.pair),
    MarketDataL2EventTicks: lambda e: book_topic(e.pair),
    MarketDataTradeEvent: lambda e: trade_topic(e.pair),
    MarketDataOHLCVEvent: lambda e: ohlc_topic(e.interval, e.pair),
    SystemStateEvent: lambda e: SYSTEM_TOPIC,
    PotentialHaltTriggerEvent: lambda e: TRIGGER_TOPIC,
    StatsEvent: lambda e: STATS_TOPIC,
    HaltDecision: lambda e: HALT_TOPIC,
}


def topic_for(event: Event) -> str:
    """The bus topic an event is published on."""
    try:
        return _TOPIC_OF[type(event)](event)
    except KeyError:
        raise SchemaError(f"not a bus event: {type(event).__name__}") from None


def parse_topic(topic: str) -> tuple[str, str | None, str | None]:
    """``(kind, interval, pair)``: ``"ohlc.1m.BTC/USD"`` -> ``("ohlc", "1m", "BTC/USD")``."""
    kind, _, rest = topic.partition(".")
    if kind in (SYSTEM_TOPIC, TRIGGER_TOPIC, HALT_TOPIC, STATS_TOPIC) and not rest:
        return kind, None, None
    if kind in ("book", "trade") and rest:
        return kind, None, _name(rest, "pair")
    interval, _, pair = rest.partition(".")
    if kind == "ohlc" and interval in OHLC_INTERVALS and pair:
        return kind, interval, _name(pair, "pair")
    raise SchemaError(f"not a bus topic: {topic!r}")


def subscription_prefix(topic: str) -> bytes:
    """The ZMQ SUBSCRIBE prefix for exactly one topic: the topic plus its space."""
    return _name(topic, "topic").encode() + b" "


def frame(topic: str, payload: bytes) -> bytes:
    """One bus message: ``topic + b" " + payload``, sent as a single ZMQ frame."""
    return _name(topic, "topic").encode() + b" " + payload


def split_frame(msg: bytes) -> tuple[str, bytes]:
    """Inverse of ``frame``: ``(topic, payload)``."""
    topic, sep, payload = bytes(msg).partition(b" ")
    if not sep or not topic:
        raise SchemaError("bus message has no 'topic SPACE payload' shape")
    return topic.decode(), payload


# --- Exact decimal <-> ticks ------------------------------------------------------------
def decimal_to_ticks(value: str, precision: int | None = None) -> tuple[int, int]:
    """``"123.45"`` -> ``(12345, 2)``, exactly; no float anywhere.

    With ``precision`` the ticks are at that precision (``("62807", 1)`` -> 628070); a
    value with more decimals than ``precision`` is an error, never a rounding. Without
    it, the precision is the number of decimals written. Only plain non-negative
    decimals are accepted (no sign, exponent, underscore or blank).
    """
    whole, dot, frac = value.partition(".")
    if not (whole.isascii() and whole.isdigit()) or (
            dot and not (frac.isascii() and frac.isdigit())):
        raise SchemaError(f"not a plain non-negative decimal: {value!r}")
    if precision is None:
        precision = len(frac)
    elif precision < 0 or len(frac) > precision:
        raise SchemaError(f"{value!r} has more decimals than precision {precision}")
    return int(whole + frac.ljust(precision, "0")), precision


def ticks_to_decimal(ticks: int, precision: int) -> str:
    """``(12345, 2)`` -> ``"123.45"``; ``(5100, 8)`` -> ``"0.00005100"`` (zeros kept)."""
    if ticks < 0 or precision < 0:
        raise SchemaError(f"ticks and precision must be non-negative: {ticks}, {precision}")
    if precision == 0:
        return str(ticks)
    digits = str(ticks).rjust(precision + 1, "0")
    return f"{digits[:-precision]}.{digits[-precision:]}"


def _levels_to_ticks(levels: list[Level], pp: int, qp: int) -> list[TickLevel]:
    out = [(decimal_to_ticks(p, pp)[0], decimal_to_ticks(q, qp)[0]) for p, q in levels]
    for p, q in out:
        if p > U64_MAX or q > U64_MAX:
            raise TickOverflowError(f"level {p}, {q} does not fit uint64 ticks")
    return out


def l2_to_ticks(event: MarketDataL2Event) -> MarketDataL2EventTicks:
    """The msgpack form of a book event, at the event's own precisions.

    Raises TickOverflowError past uint64, SchemaError for a value with more decimals
    than its precision.
    """
    fields = msgspec.structs.asdict(event)
    pp, qp = event.price_precision, event.qty_precision
    fields["bids"] = _levels_to_ticks(event.bids, pp, qp)
    fields["asks"] = _levels_to_ticks(event.asks, pp, qp)
    return MarketDataL2EventTicks(**fields)


def l2_from_ticks(event: MarketDataL2EventTicks) -> MarketDataL2Event:
    """Back to decimal strings at the event's precisions (exact)."""
    fields = msgspec.structs.asdict(event)
    pp, qp = fields["price_precision"], fields["qty_precision"]
    for side in ("bids", "asks"):
        fields[side] = [(ticks_to_decimal(p, pp), ticks_to_decimal(q, qp))
                        for p, q in fields[side]]
    return MarketDataL2Event(**fields)


# --- Time helpers (pure arithmetic, no clock) -------------------------------------------
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)",
                      re.IGNORECASE)


def rfc3339_to_ns(ts: str) -> int:
    """``"2023-10-04T16:25:00.000000000Z"`` -> unix ns, exact to the nanosecond.

    Digits past the ninth are truncated.
    """
    m = _RFC3339.fullmatch(ts)
    if m is None:
        raise SchemaError(f"not an RFC3339 timestamp: {ts!r}")
    whole, frac, zone = m.groups()
    try:
        dt = datetime.fromisoformat(whole + ("+00:00" if zone.upper() == "Z" else zone))
    except ValueError as exc:
        raise SchemaError(f"not an RFC3339 timestamp: {ts!r}") from exc
    seconds = (dt - _EPOCH) // timedelta(seconds=1)
    return seconds * 1_000_000_000 + int((frac or "0")[:9].ljust(9, "0"))


def ns_to_rfc3339(ns: int) -> str:
    """Unix ns -> ``"2026-08-16T23:37:03.745044000Z"`` (UTC, nine decimals)."""
    seconds, frac = divmod(ns, 1_000_000_000)
    dt = _EPOCH + timedelta(seconds=seconds)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{frac:09d}Z"


# --- Envelopes --------------------------------------------------------------------------
class _RawEnvelope(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    v: int
    topic: str
    epoch: U64
    seq: int
    pub_ns: int
    type: str
    event: msgspec.Raw


_JSON_ENCODER = msgspec.json.Encoder()
_MSGPACK_ENCODER = msgspec.msgpack.Encoder()
_RAW_JSON = msgspec.json.Decoder(_RawEnvelope)
_RAW_MSGPACK = msgspec.msgpack.Decoder(_RawEnvelope)
_JSON_DECODERS = {name: msgspec.json.Decoder(cls) for name, cls in EVENT_TYPES.items()}
_MSGPACK_DECODERS = {name: msgspec.msgpack.Decoder(cls) for name, cls in EVENT_TYPES.items()}


def make_envelope(event: Event, *, epoch: int, seq: int, pub_ns: int) -> Envelope[Event]:
    """Wrap an event for publishing; topic and type are derived from it."""
    return Envelope(v=SCHEMA_VERSION, topic=topic_for(event), epoch=epoch, seq=seq,
                    pub_ns=pub_ns, type=type(event).__name__, event=event)


def encode_envelope_json(env: Envelope[Any]) -> bytes:
    if isinstance(env.event, MarketDataL2EventTicks):
        raise SchemaError("JSON carries decimal strings: use l2_from_ticks() first")
    return _JSON_ENCODER.encode(env)


def encode_envelope_msgpack(env: Envelope[Any]) -> bytes:
    if isinstance(env.event, MarketDataL2Event):
        raise SchemaError("msgpack carries book ticks: use l2_to_ticks() first")
    return _MSGPACK_ENCODER.encode(env)


def _typed(raw: _RawEnvelope, decoders: dict[str, Any]) -> tuple[Envelope[Any], Any]:
    if raw.v != SCHEMA_VERSION:
        raise SchemaError(f"schema version {raw.v}, this decoder speaks {SCHEMA_VERSION}")
    decoder = decoders.get(raw.type)
    if decoder is None:
        raise SchemaError(f"unknown event type {raw.type!r}")
    event = decoder.decode(raw.event)
    env = Envelope(v=raw.v, topic=raw.topic, epoch=raw.epoch, seq=raw.seq,
                   pub_ns=raw.pub_ns, type=raw.type, event=event)
    return env, event


def decode_envelope_json(payload: bytes) -> tuple[Envelope[Any], Any]:
    """JSON payload -> ``(envelope, typed event)``; raises msgspec.ValidationError or
    SchemaError (wrong version, unknown type)."""
    return _typed(_RAW_JSON.decode(payload), _JSON_DECODERS)


def decode_envelope_msgpack(payload: bytes) -> tuple[Envelope[Any], Any]:
    """msgpack payload -> ``(envelope, typed event)``, like decode_envelope_json."""
    return _typed(_RAW_MSGPACK.decode(payload), _MSGPACK_DECODERS)


# --- JSON Schema ------------------------------------------------------------------------
def json_schema_document() -> dict[str, Any]:
    """Every schema, generated from the Structs: envelope plus one per event type."""
    return {
        "schema_version": SCHEMA_VERSION,
        "envelope": msgspec.json.schema(Envelope),
        "events": {name: msgspec.json.schema(cls) for name, cls in EVENT_TYPES.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bus.schema",
        description="The krakenfeed bus event contract (see docs/events.md).")
    parser.add_argument("--json-schema", action="store_true",
                        help="print one JSON document: schema_version, the envelope "
                             "schema and every event schema, generated from the Structs")
    parser.add_argument("--indent", type=int, default=2, help="JSON indent (default 2)")
    args = parser.parse_args(argv)
    if not args.json_schema:
        parser.print_help(sys.stderr)
        return 2
    sys.stdout.write(json.dumps(json_schema_document(), indent=args.indent) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
