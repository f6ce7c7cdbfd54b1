"""Kraken Spot WebSocket v2 frames -> typed values, with exact numbers.

Every byte from Kraken enters through this module (PROTOCOL.md sections 1-3). It is
pure: bytes in, frozen msgspec Structs out, one typed error (`WireError`) for anything
malformed or unknown, never another exception.

Two entry points:

* `decode_book(frame, precisions)` is the hot path (bookd, the replay server, the
  verifier): a `book` frame becomes `BookUpdate`s whose levels are integer ticks.
* `decode_message(frame)` is for the session (ingest): status, heartbeat, pong, acks,
  error frames, trade, ohlc, instrument and book, dispatched on `channel` or `method`.

and two cheap peeks for ingest, which forwards book frames without decoding them:
`peek_channel(frame)` and `peek_symbol(frame)`.

Exact ticks (DESIGN.md section 2)
---------------------------------
A level's price and qty must become `token * 10**precision` exactly, whatever the
digits (`1234567890.12345678` at 8 decimals included), and a token whose value has more
decimals than the precision is an error, never a rounding (zeros past the precision, as
in `1.50` at precision 1, are no extra decimals: the fast path cannot see them, so
neither route does). Two routes:

* **exact route**: decode the number tokens as `msgspec.Raw`, then integer arithmetic on
  their text (`_token_ticks`). Always right; about twice the cost.
* **float fast path** with a guard that provably falls back to the exact route:

  1. *Frame guard.* The frame is mapped with one `bytes.translate` (digits, `.`, `+`
     and `-` -> `1`, `e`/`E` -> `e`, anything else -> space). If it holds a run of 16
     `1`s (16 or more digit/dot/sign characters in a row), the whole frame takes the
     exact route. So on the fast path every number token T is M or M`e`E with a
     mantissa M of at most 15 characters: a decimal of at most 15 significant digits.
     (Signs only lengthen runs: conservative. An `e` ends a run, hence "mantissa".)
  2. *Token check.* With x = double(T) and s = 10**p (exact for p <= 22), take
     n = round(x*s) and accept only if 0 <= n < 10**15 and n / s == x (the division of
     two exact doubles is correctly rounded, so n / s == double(n * 10**-p)), and, when
     n == 0, only if the frame holds no exponent at all (no `e` followed by a `1` in
     the mapped frame: `1e5`, `1E-5`, `1e+5` all map to `1e1...`). A signed zero (`-0`,
     `-0.0`) passes as n = 0: its value is zero, not negative, and the exact route
     agrees (msgspec even decodes the integer token `-0` as +0.0).

  Why that is exact: for n >= 1, n * 10**-p is a decimal of at most 15 significant
  digits in the normal range of binary64 (>= 1e-22), and so is T (its double x equals
  n / s); two such decimals map to the same double only if they are equal (every
  15-digit decimal round-trips through binary64). So acceptance means T == n * 10**-p
  exactly. For n == 0, x == 0.0: a nonzero T can only underflow to 0.0 with an exponent
  (without one it has at most 15 characters, so it is >= 1e-13), and an exponent
  anywhere in the frame sends it to the exact route. A tiny nonzero x (subnormal
  included) gives n == 0 and fails n / s == x. Conversely, when T == N * 10**-p with
  N < 10**15, x*s is within N * 2**-52 (< 0.25) of N, so n == N and the check passes
  (zeros only when the frame has no exponent: real frames never do).
  A failed check is not an error by itself: the frame is decoded again on the exact
  route, which raises the precise error if there is one. So is a frame msgspec cannot
  decode with float fields (`1e400` is out of a double's range but 10**400 ticks on the
  exact route), and x*s overflowing to inf (`1e300` at 8 decimals) is a failed check.

  Cost (CPython 3.11, ~200-byte frames): the exponent search is as dear as the
  translate and the run search together, so it runs only for a level holding a zero
  value (a delete: in ~25-35% of update frames).

The property test in tests/unit/test_wire.py checks both routes against `Decimal`.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

import msgspec
from msgspec import Raw, Struct

__all__ = [
    "WireError", "BookUpdate", "decode_book", "decode_message", "peek_channel",
    "peek_symbol", "token_ticks", "decimal_text", "Heartbeat", "Status", "StatusData",
    "Ack", "AckResult", "Pong", "ErrorFrame", "BookMessage", "TradeMessage", "Trade",
    "OhlcMessage", "Candle", "InstrumentMessage", "InstrumentPair", "Message",
]


class WireError(ValueError):
    """A frame that is malformed, unknown, or whose numbers cannot be represented."""


# --------------------------------------------------------------------------------------
# exact number handling

_POW10 = [10**i for i in range(64)]
# precision -> 10.0**precision, the exact doubles (up to 1e22); a dict, so a precision
# outside 0..22 is simply absent (and takes the exact route)
_FSCALE = {i: float(10**i) for i in range(23)}
# Tick counts are Python ints; beyond this many digits a token is refused (WireError)
# rather than handed to int(), which raises ValueError past sys.int_info's 4300 digits
# and would build gigantic ints from tokens like 1e999999999.
_MAX_TICK_DIGITS = 4000

_GUARD_TABLE = bytearray(b" " * 256)
for _c in b"0123456789.":
    _GUARD_TABLE[_c] = ord("1")
_GUARD_TABLE[ord("+")] = _GUARD_TABLE[ord("-")] = ord("1")
_GUARD_TABLE[ord("e")] = _GUARD_TABLE[ord("E")] = ord("e")
_GUARD_TABLE = bytes(_GUARD_TABLE)
_RUN16 = b"1" * 16


def _fast_path_allowed(frame: bytes) -> bool:
    """The frame guard: no run of 16 digit/dot/sign characters, so every number token's
    mantissa has at most 15 significant digits (module docstring).

    `find` rather than `in`: on CPython 3.11 `bytes.__contains__` measured ~0.1 us slower
    per search on a 200-byte frame. `decode_book` inlines this same expression (it
    needs the mapped frame again); the tests check the two agree.
    """
    return frame.translate(_GUARD_TABLE).find(_RUN16) < 0


def token_ticks(token: bytes | str, precision: int) -> int:
    """Exact `token * 10**precision` as an int for a JSON number token.

    Raises WireError for a negative value (a signed zero is zero), a non-number, or a
    value with more decimals than `precision` (after exponent notation and trailing
    zeros are taken into account: the check is on the value, never a rounding).
    """
    s = token if isinstance(token, bytes) else token.encode()
    if not s:
        raise WireError("empty number")
    if s[0] == 45:  # b"-": only a zero may carry the sign (-0 == 0, as on the fast path)
        rest = s[1:]
        if not rest[:1].isdigit() or token_ticks(rest, precision):
            raise WireError(f"negative number {s[:40]!r}")
        return 0
    if b"e" in s or b"E" in s:
        return _exp_ticks(s, precision)
    whole, dot, frac = s.partition(b".")
    if not whole.isdigit() or (dot and not frac.isdigit()):
        raise WireError(f"not a decimal number: {s[:40]!r}")
    n = len(frac)
    if n > precision:
        # Zeros past the precision change no value; the float fast path cannot see them
        # either, so both routes accept "1.50" at precision 1 (as they do "1.50e0").
        if precision < 0 or frac[precision:].strip(b"0"):
            raise WireError(f"{s[:40].decode()} has more decimals than the precision {precision}")
        frac = frac[:precision]
        n = precision
    k = precision - n
    if len(whole) + len(frac) + k > _MAX_TICK_DIGITS:
        raise WireError(f"number too large: {s[:40]!r}... ({len(s)} characters)")
    return int(whole + frac) * (_POW10[k] if k < 64 else 10**k)


def _exp_ticks(s: bytes, precision: int) -> int:
    # Exact integer arithmetic on the token's digits and exponent: no decimal context,
    # so nothing can underflow to 0 (1e-9999999 is an error, not 0 ticks) or overflow.
    try:
        d = Decimal(s.decode("ascii"))
    except (InvalidOperation, UnicodeDecodeError):
        raise WireError(f"not a decimal number: {s[:40]!r}") from None
    if not d.is_finite() or d.is_signed():
        raise WireError(f"not a non-negative finite number: {s[:40]!r}")
    _, digits, exp = d.as_tuple()
    text = "".join(map(str, digits)).rstrip("0")
    if not text:
        return 0
    shift = exp + (len(digits) - len(text)) + precision  # ticks = int(text) * 10**shift
    if shift < 0:
        raise WireError(f"{s[:40].decode()} has more decimals than the precision {precision}")
    if len(text) + shift > _MAX_TICK_DIGITS:
        raise WireError(f"number too large: {s[:40]!r}")
    return int(text) * 10**shift


def decimal_text(token: bytes | Raw) -> str:
    """The exact decimal text of a JSON number token, in plain (non-exponent) notation."""
    s = bytes(token)
    try:
        if b"e" in s or b"E" in s:
            d = Decimal(s.decode("ascii"))
            if not d.is_finite():
                raise WireError(f"not a finite number: {s[:40]!r}")
            if not -_MAX_TICK_DIGITS <= d.as_tuple().exponent <= _MAX_TICK_DIGITS:
                raise WireError(f"exponent out of range: {s[:40]!r}")  # 1e999999999
            return format(d, "f")
        text = s.decode("ascii")
    except (InvalidOperation, UnicodeDecodeError):
        raise WireError(f"not a number: {s[:40]!r}") from None
    whole, dot, frac = text.lstrip("-").partition(".")
    if not whole.isdigit() or (dot and not frac.isdigit()):
        raise WireError(f"not a number: {s[:40]!r}")
    return text


# --------------------------------------------------------------------------------------
# book: the hot path

def _book_structs(number: type) -> type:
    """The book frame's shape with `number` for price and qty: float (fast path) or Raw
    (exact route). One definition, so the two decoders cannot drift apart."""
    level = msgspec.defstruct("Level", [("price", number), ("qty", number)], gc=False)
    data = msgspec.defstruct("BookData", [
        ("symbol", str), ("checksum", int), ("bids", list[level], []),
        ("asks", list[level], []), ("timestamp", str | None, None)], gc=False)
    return msgspec.defstruct("BookMsg", [("type", str), ("data", list[data])], gc=False)


_BookMsgF = _book_structs(float)
_BookMsgR = _book_structs(Raw)


class BookUpdate(Struct, frozen=True, gc=False):
    """One `data[]` entry of a book frame, levels as (price_ticks, qty_ticks)."""

    symbol: str
    snapshot: bool
    bids: list[tuple[int, int]]
    asks: list[tuple[int, int]]
    checksum: int
    timestamp: str | None = None


# msgspec raises UnicodeDecodeError (not a DecodeError) for invalid UTF-8 in a string.
_DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError)

_book_dec_f = msgspec.json.Decoder(_BookMsgF)
_book_dec_r = msgspec.json.Decoder(_BookMsgR)


def _levels_fast(levels: list, ps: float, qs: float,
                 mapped: bytes) -> list[tuple[int, int]] | None:
    """Levels as ticks if every token passes the token check (module docstring), else None.

    `mapped` is the frame after the guard's translate, searched for an exponent only when
    a value is zero. A literal limit rather than a global: measured 5-10% of this loop.
    """
    out = []
    try:
        for lv in levels:
            x = lv.price
            y = lv.qty
            p = round(x * ps)
            q = round(y * qs)
            if p / ps != x or q / qs != y or not (0 <= p < 10**15 and 0 <= q < 10**15):
                return None
            if not (p and q) and mapped.find(b"e1") >= 0:  # 0.0 may be an underflow
                return None
            out.append((p, q))
    except OverflowError:  # x * scale is inf, round() refuses: an exponent token
        return None
    return out


def _levels_exact(levels: list, pp: int, qp: int) -> list[tuple[int, int]]:
    return [(token_ticks(bytes(lv.price), pp), token_ticks(bytes(lv.qty), qp)) for lv in levels]


def _type_flag(t: str) -> bool:
    if t == "update":
        return False
    if t == "snapshot":
        return True
    raise WireError(f"book frame with unknown type {t!r}")


def decode_book(frame: bytes, precisions: dict[str, tuple[int, int]]) -> list[BookUpdate]:
    """Decode a `book` frame into BookUpdates with exact integer ticks.

    `precisions` maps symbol -> (price_precision, qty_precision). A symbol without a
    precision, a malformed frame, or a token that is not exactly representable at the
    precision raises WireError.
    """
    mapped = frame.translate(_GUARD_TABLE)
    if mapped.find(_RUN16) < 0:  # _fast_path_allowed(frame), inlined (saves a call)
        try:
            msg = _book_dec_f.decode(frame)
        except _DECODE_ERRORS:  # malformed, or a number beyond a double (1e400)
            return _decode_book_exact(frame, precisions)
        typ = msg.type
        snap = typ == "snapshot"
        if not snap and typ != "update":
            raise WireError(f"book frame with unknown type {typ!r}")
        out = []
        for d in msg.data:
            symbol = d.symbol
            try:
                pp, qp = precisions[symbol]
            except KeyError:
                raise WireError(f"no precision known for symbol {symbol!r}") from None
            try:
                ps = _FSCALE[pp]
                qs = _FSCALE[qp]
            except KeyError:  # a precision beyond 22: 10**p is no exact double
                break
            # An update usually has one empty side: keep msgspec's (fresh) empty list.
            bids = d.bids
            if bids and (bids := _levels_fast(bids, ps, qs, mapped)) is None:
                break
            asks = d.asks
            if asks and (asks := _levels_fast(asks, ps, qs, mapped)) is None:
                break
            out.append(BookUpdate(symbol, snap, bids, asks, d.checksum, d.timestamp))
        else:
            return out
    return _decode_book_exact(frame, precisions)


def _decode_book_exact(frame: bytes, precisions: dict[str, tuple[int, int]]) -> list[BookUpdate]:
    try:
        msg = _book_dec_r.decode(frame)
    except _DECODE_ERRORS as e:
        raise WireError(f"malformed book frame: {e}") from None
    snap = _type_flag(msg.type)
    out = []
    for d in msg.data:
        try:
            pp, qp = precisions[d.symbol]
        except KeyError:
            raise WireError(f"no precision known for symbol {d.symbol!r}") from None
        out.append(BookUpdate(d.symbol, snap, _levels_exact(d.bids, pp, qp),
                              _levels_exact(d.asks, pp, qp), d.checksum, d.timestamp))
    return out


# --------------------------------------------------------------------------------------
# peeks for ingest (no decode)

_CHANNEL_PREFIX = b'{"channel":"'
_SYMBOL_KEY = b'"symbol":"'


def peek_channel(frame: bytes) -> str | None:
    """The channel name when the frame starts with `{"channel":"...`, else None.

    Kraken always puts `channel` first; a frame that does not is classified by
    `decode_message` instead.
    """
    if frame.startswith(_CHANNEL_PREFIX):
        end = frame.find(b'"', 12)
        if end > 12:
            return frame[12:end].decode("ascii", "replace")
    return None


def peek_symbol(frame: bytes) -> str | None:
    """The first `"symbol":"..."` value in the frame, without decoding it."""
    i = frame.find(_SYMBOL_KEY)
    if i < 0:
        return None
    i += len(_SYMBOL_KEY)
    j = frame.find(b'"', i)
    if j < 0 or j - i > 32:
        return None
    return frame[i:j].decode("ascii", "replace")


# --------------------------------------------------------------------------------------
# everything else: the session's messages

class Heartbeat(Struct, frozen=True):
    pass


class StatusData(Struct, frozen=True):
    system: str
    api_version: str = ""
    connection_id: int = 0
    version: str = ""


class Status(Struct, frozen=True):
    data: list[StatusData]
    type: str = "update"


class BookMessage(Struct, frozen=True):
    """A book frame seen by the session: only what liveness needs (symbol, type)."""

    type: str
    symbols: tuple[str, ...]


class Trade(Struct, frozen=True):
    symbol: str
    side: str
    price: str
    qty: str
    ord_type: str
    trade_id: int
    timestamp: str


class TradeMessage(Struct, frozen=True):
    type: str
    data: list[Trade]


class Candle(Struct, frozen=True):
    symbol: str
    open: str
    high: str
    low: str
    close: str
    vwap: str
    volume: str
    trades: int
    interval_begin: str
    interval: int


class OhlcMessage(Struct, frozen=True):
    type: str
    data: list[Candle]


class InstrumentPair(Struct, frozen=True):
    symbol: str
    status: str
    price_precision: int
    qty_precision: int
    base: str = ""
    quote: str = ""
    price_increment: str = ""
    qty_increment: str = ""
    qty_min: str = ""


class InstrumentMessage(Struct, frozen=True):
    type: str
    pairs: list[InstrumentPair]


class AckResult(Struct, frozen=True):
    channel: str = ""
    symbol: str | None = None
    depth: int | None = None
    interval: int | None = None
    snapshot: bool | None = None
    warnings: tuple[str, ...] = ()


class Ack(Struct, frozen=True):
    """A subscribe/unsubscribe acknowledgement; `success` must always be checked.

    A refused subscription may carry no `result` and no symbol (PROTOCOL.md 1.4).
    """

    method: str
    success: bool
    result: AckResult | None = None
    error: str | None = None
    req_id: int | None = None
    symbol: str | None = None  # top-level symbol on some refusals ("Currency pair not supported")


class Pong(Struct, frozen=True):
    req_id: int | None = None


class ErrorFrame(Struct, frozen=True):
    """`{"Error": "Exceeded msg rate"}` (capital E) or `{"error": ..., "method": "error"}`."""

    error: str
    req_id: int | None = None


Message = (Heartbeat | Status | BookMessage | TradeMessage | OhlcMessage | InstrumentMessage
           | Ack | Pong | ErrorFrame)


class _Envelope(Struct, gc=False):
    channel: str | None = None
    method: str | None = None
    type: str | None = None
    Error: str | None = None
    error: str | None = None


class _StatusRaw(Struct):
    data: list[StatusData]
    type: str = "update"


class _BookPeek(Struct):
    symbol: str


class _BookPeekMsg(Struct):
    type: str
    data: list[_BookPeek]


class _TradeRaw(Struct):
    symbol: str
    side: str
    price: Raw
    qty: Raw
    ord_type: str
    trade_id: int
    timestamp: str


class _TradeMsgRaw(Struct):
    type: str
    data: list[_TradeRaw]


class _CandleRaw(Struct):
    symbol: str
    open: Raw
    high: Raw
    low: Raw
    close: Raw
    vwap: Raw
    volume: Raw
    interval_begin: str
    interval: int
    trades: Raw = Raw(b"0")


class _OhlcMsgRaw(Struct):
    type: str
    data: list[_CandleRaw]


class _InstrPairRaw(Struct):
    symbol: str
    status: str
    price_precision: int
    qty_precision: int
    base: str = ""
    quote: str = ""
    price_increment: Raw = Raw(b'""')
    qty_increment: Raw = Raw(b'""')
    qty_min: Raw = Raw(b'""')


class _InstrData(Struct):
    pairs: list[_InstrPairRaw] = []


class _InstrMsgRaw(Struct):
    type: str
    data: _InstrData


class _AckRaw(Struct):
    method: str
    success: bool = False
    result: AckResult | None = None
    error: str | None = None
    req_id: int | None = None
    symbol: str | None = None


class _PongRaw(Struct):
    req_id: int | None = None


_env_dec = msgspec.json.Decoder(_Envelope)
_status_dec = msgspec.json.Decoder(_StatusRaw)
_book_peek_dec = msgspec.json.Decoder(_BookPeekMsg)
_trade_dec = msgspec.json.Decoder(_TradeMsgRaw)
_ohlc_dec = msgspec.json.Decoder(_OhlcMsgRaw)
_instr_dec = msgspec.json.Decoder(_InstrMsgRaw)
_ack_dec = msgspec.json.Decoder(_AckRaw)
_pong_dec = msgspec.json.Decoder(_PongRaw)


def _optional_decimal(raw: Raw) -> str:
    b = bytes(raw)
    return "" if b in (b'""', b"null") else decimal_text(b)


def _trades_count(raw: Raw) -> int:
    text = decimal_text(raw)
    whole, _, frac = text.partition(".")
    if frac.strip("0") or len(whole) > _MAX_TICK_DIGITS:
        raise WireError(f"trades count is not an integer of sane size: {text[:40]}")
    return int(whole)


def _decode_channel(channel: str, frame: bytes) -> Message:
    if channel == "heartbeat":
        return Heartbeat()
    if channel == "book":
        m = _book_peek_dec.decode(frame)
        _type_flag(m.type)
        return BookMessage(m.type, tuple(d.symbol for d in m.data))
    if channel == "status":
        m = _status_dec.decode(frame)
        if not m.data:
            raise WireError("status frame without data")
        return Status(m.data, m.type)
    if channel == "trade":
        m = _trade_dec.decode(frame)
        return TradeMessage(m.type, [
            Trade(t.symbol, t.side, decimal_text(t.price), decimal_text(t.qty), t.ord_type,
                  t.trade_id, t.timestamp) for t in m.data])
    if channel == "ohlc":
        m = _ohlc_dec.decode(frame)
        return OhlcMessage(m.type, [
            Candle(c.symbol, decimal_text(c.open), decimal_text(c.high), decimal_text(c.low),
                   decimal_text(c.close), decimal_text(c.vwap), decimal_text(c.volume),
                   _trades_count(c.trades), c.interval_begin, c.interval) for c in m.data])
    if channel == "instrument":
        m = _instr_dec.decode(frame)
        return InstrumentMessage(m.type, [
            InstrumentPair(p.symbol, p.status, p.price_precision, p.qty_precision, p.base,
                           p.quote, _optional_decimal(p.price_increment),
                           _optional_decimal(p.qty_increment), _optional_decimal(p.qty_min))
            for p in m.data.pairs])
    raise WireError(f"unknown channel {channel[:40]!r}")


def decode_message(frame: bytes) -> Message:
    """Decode any Kraken v2 frame into one of the `Message` Structs, or raise WireError."""
    try:
        env = _env_dec.decode(frame)
        if env.channel is not None:
            return _decode_channel(env.channel, frame)
        if env.Error is not None:
            return ErrorFrame(env.Error)
        method = env.method
        if method in ("subscribe", "unsubscribe"):
            a = _ack_dec.decode(frame)
            if not a.success and a.error is None:
                raise WireError(f"{method} ack with success=false and no error")
            return Ack(a.method, a.success, a.result, a.error, a.req_id, a.symbol)
        if method == "pong":
            return Pong(_pong_dec.decode(frame).req_id)
        if env.error is not None:
            return ErrorFrame(env.error, _pong_dec.decode(frame).req_id)
        if method is not None:
            raise WireError(f"unknown method {method[:40]!r}")
        raise WireError("frame has neither channel nor method")
    except _DECODE_ERRORS as e:  # includes ValidationError
        raise WireError(f"malformed frame: {e}") from None
