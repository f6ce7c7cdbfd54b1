"""The frames the replay server makes itself, shaped exactly like Kraken's (PROTOCOL.md).

Pure functions, bytes out: acks and refusals, status, heartbeat, pong, generated book
snapshots (ticks rendered back to decimal text with exactly `precision` decimals,
trailing zeros kept, as Kraken prints them), the synthesized instrument snapshot,
trade/ohlc snapshots from recent frames, the fault frames (garbage, truncated,
oversized, a corrupted checksum), and the WebSocket framing used for batched writes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import msgspec
from msgspec import Raw, Struct

__all__ = ["ws_frame", "ws_header", "rfc3339", "status_frame", "HEARTBEAT", "RATE_LIMITED", "ack",
           "error_ack", "pong", "render_ticks", "book_snapshot", "instrument_snapshot",
           "increment_text", "items_snapshot", "ohlc_snapshot", "corrupt_checksum",
           "garbage_frame", "truncated_frame", "oversized_frame", "API_VERSION",
           "SERVER_VERSION"]

SERVER_VERSION = "2.0.10"
API_VERSION = "v2"
HEARTBEAT = b'{"channel":"heartbeat"}'
RATE_LIMITED = b'{"Error":"Exceeded msg rate"}'

_enc = msgspec.json.Encoder()

# -------------------------------------------------------------------------------------
# WebSocket framing (server side: never masked). One TEXT frame, FIN set.

_SMALL_HEADERS = [bytes((0x81, n)) for n in range(126)]
_H16 = struct.Struct("!BBH")
_H64 = struct.Struct("!BBQ")


def ws_header(n: int) -> bytes:
    if n < 126:
        return _SMALL_HEADERS[n]
    if n < 65536:
        return _H16.pack(0x81, 126, n)
    return _H64.pack(0x81, 127, n)


def ws_frame(payload: bytes) -> bytes:
    """A complete unmasked TEXT frame (RFC 6455 section 5.2) carrying `payload`."""
    return ws_header(len(payload)) + payload


# -------------------------------------------------------------------------------------
# time

def rfc3339(wall_ns: int) -> str:
    """`2026-08-16T23:37:04.849274Z` (microseconds, UTC), like Kraken's time_in/out."""
    sec, ns = divmod(wall_ns, 1_000_000_000)
    return datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ns // 1000:06d}Z"


# -------------------------------------------------------------------------------------
# control frames

def status_frame(system: str, connection_id: int) -> bytes:
    return (b'{"channel":"status","type":"update","data":[{"version":"%s","system":"%s",'
            b'"api_version":"%s","connection_id":%d}]}'
            % (SERVER_VERSION.encode(), system.encode(), API_VERSION.encode(), connection_id))


def ack(method: str, result: dict, time_in: str, time_out: str, req_id: int | None) -> bytes:
    """A success ack: `{"method","result","success":true,"time_in","time_out"[,"req_id"]}`."""
    msg: dict = {"method": method, "result": result, "success": True,
                 "time_in": time_in, "time_out": time_out}
    if req_id is not None:
        msg["req_id"] = req_id
    return _enc.encode(msg)


def error_ack(method: str, error: str, time_in: str, time_out: str, req_id: int | None,
              symbol: str | None = None) -> bytes:
    """A refusal: no `result`; `symbol` only where Kraken puts one (unknown pair)."""
    msg: dict = {"error": error, "method": method, "success": False}
    if symbol is not None:
        msg["symbol"] = symbol
    msg["time_in"] = time_in
    msg["time_out"] = time_out
    if req_id is not None:
        msg["req_id"] = req_id
    return _enc.encode(msg)


def pong(req_id: int | None, time_in: str, time_out: str) -> bytes:
    msg: dict = {"method": "pong"}
    if req_id is not None:
        msg["req_id"] = req_id
    msg["time_in"] = time_in
    msg["time_out"] = time_out
    return _enc.encode(msg)


# -------------------------------------------------------------------------------------
# book snapshot from ticks

def render_ticks(ticks: int, precision: int) -> bytes:
    """Integer ticks as the decimal Kraken prints: exactly `precision` decimals."""
    s = b"%d" % ticks
    if precision <= 0:
        return s
    if len(s) <= precision:
        s = s.rjust(precision + 1, b"0")
    return s[:-precision] + b"." + s[-precision:]


def _levels(levels: Iterable[tuple[int, int]], pp: int, qp: int) -> bytes:
    return b",".join(b'{"price":%s,"qty":%s}' % (render_ticks(p, pp), render_ticks(q, qp))
                     for p, q in levels)


def book_snapshot(symbol: str, bids: Sequence[tuple[int, int]], asks: Sequence[tuple[int, int]],
                  pp: int, qp: int, checksum: int, timestamp: str | None) -> bytes:
    """A book snapshot frame in Kraken's key order (bids, asks, checksum, timestamp)."""
    ts = b',"timestamp":' + _enc.encode(timestamp) if timestamp else b""
    return (b'{"channel":"book","type":"snapshot","data":[{"symbol":%s,"bids":[%s],'
            b'"asks":[%s],"checksum":%d%s}]}'
            % (_enc.encode(symbol), _levels(bids, pp, qp), _levels(asks, pp, qp), checksum, ts))


# -------------------------------------------------------------------------------------
# instrument

def increment_text(precision: int) -> bytes:
    """10**-precision as Kraken's instrument channel prints it: 0.1, 0.0001, 1e-05, 1e-08."""
    if precision <= 0:
        return b"1"
    return repr(10.0 ** -precision).encode()


def instrument_snapshot(symbols: Sequence[str], precisions: dict[str, tuple[int, int]]) -> bytes:
    """An instrument snapshot listing `symbols` (PROTOCOL.md 2.6 shapes, exponent notation)."""
    assets: dict[str, int] = {}
    pairs = []
    for sym in symbols:
        pp, qp = precisions[sym]
        base, _, quote = sym.partition("/")
        assets[base] = max(assets.get(base, 0), qp)
        assets.setdefault(quote, 2)
        inc_p = increment_text(pp)
        inc_q = increment_text(qp)
        pairs.append(
            b'{"symbol":%s,"base":%s,"quote":%s,"status":"online","qty_precision":%d,'
            b'"qty_increment":%s,"price_precision":%d,"cost_precision":5,'
            b'"ws_display_price_precision":%d,"marginable":false,"has_index":false,'
            b'"cost_min":0.5,"tick_size":%s,"price_increment":%s,"qty_min":%s}'
            % (_enc.encode(sym), _enc.encode(base), _enc.encode(quote), qp, inc_q, pp, pp,
               inc_p, inc_p, inc_q))
    asset_items = [
        b'{"id":%s,"status":"enabled","precision":%d,"precision_display":%d,'
        b'"borrowable":false,"collateral_value":0.0,"margin_rate":0.0}'
        % (_enc.encode(a), max(p, 2), min(max(p, 2), 5)) for a, p in assets.items()]
    return (b'{"channel":"instrument","type":"snapshot","data":{"assets":[%s],"pairs":[%s]}}'
            % (b",".join(asset_items), b",".join(pairs)))


# -------------------------------------------------------------------------------------
# trade and ohlc snapshots from recent verbatim frames

class _Items(Struct):
    data: list[Raw]


class _Candle(Struct):
    interval_begin: str = ""


_items_dec = msgspec.json.Decoder(_Items)
_candle_dec = msgspec.json.Decoder(_Candle)


def _data_items(frames: Iterable[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for f in frames:
        try:
            out.extend(bytes(r) for r in _items_dec.decode(f).data)
        except msgspec.DecodeError:
            continue
    return out


def items_snapshot(channel: str, frames: Iterable[bytes], limit: int = 50) -> bytes:
    """`{"channel":C,"type":"snapshot","data":[...]}` from the last `limit` data items."""
    items = _data_items(frames)[-limit:]
    return b'{"channel":"%s","type":"snapshot","data":[%s]}' % (channel.encode(),
                                                                 b",".join(items))


def ohlc_snapshot(frames: Iterable[bytes], limit: int = 50) -> bytes:
    """The latest version of each of the last `limit` candles seen, oldest first."""
    latest: dict[str, bytes] = {}
    for item in _data_items(frames):
        try:
            key = _candle_dec.decode(item).interval_begin
        except msgspec.DecodeError:
            continue
        latest.pop(key, None)
        latest[key] = item
    items = list(latest.values())[-limit:]
    return b'{"channel":"ohlc","type":"snapshot","data":[%s]}' % b",".join(items)


# -------------------------------------------------------------------------------------
# fault frames

_CHECKSUM_KEY = b'"checksum":'


def corrupt_checksum(frame: bytes) -> bytes:
    """The frame with every checksum value replaced by a different u32."""
    out = []
    pos = 0
    while True:
        i = frame.find(_CHECKSUM_KEY, pos)
        if i < 0:
            break
        j = i + len(_CHECKSUM_KEY)
        k = j
        while k < len(frame) and 48 <= frame[k] <= 57:
            k += 1
        if k == j:
            pos = j
            continue
        bad = int(frame[j:k]) ^ 0x5A5A5A5A
        out.append(frame[pos:j] + b"%d" % bad)
        pos = k
    out.append(frame[pos:])
    return b"".join(out)


def garbage_frame() -> bytes:
    return b"<html><body>502 Bad Gateway</body></html> garbage, not JSON {]"


def truncated_frame(sample: bytes) -> bytes:
    """The first half of a frame (a book frame when one is given)."""
    if len(sample) < 16:
        sample = b'{"channel":"book","type":"update","data":[{"symbol":"BTC/USD","bids":[]}]}'
    return sample[: len(sample) // 2]


def oversized_frame(nbytes: int) -> bytes:
    """A valid JSON heartbeat padded to exactly `nbytes` bytes."""
    head = b'{"channel":"heartbeat","padding":"'
    tail = b'"}'
    pad = max(0, nbytes - len(head) - len(tail))
    return head + b"x" * pad + tail
