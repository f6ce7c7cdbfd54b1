"""ingest/wire.py: every real frame decodes; ticks are exact on both routes; only WireError.

Exactness is checked against `Decimal` (DESIGN.md section 2). The float fast path and the
exact `Raw` route must give the same ticks, and the frame guard must send a frame to the
exact route exactly when the fast path could be wrong (PROTOCOL.md 3.3).
"""

from __future__ import annotations

import json
import re
from decimal import Context, Decimal, localcontext
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ingest import wire
from ingest.wire import (
    Ack,
    BookMessage,
    BookUpdate,
    ErrorFrame,
    Heartbeat,
    InstrumentMessage,
    OhlcMessage,
    Pong,
    Status,
    TradeMessage,
    WireError,
    decode_book,
    decode_message,
    peek_channel,
    peek_symbol,
    token_ticks,
)
from tests import vectors

needs_vectors = pytest.mark.skipif(not vectors.available(),
                                   reason=f"no vectors at {vectors.VECTORS_DIR}")
# No timing assertions: hypothesis deadlines off everywhere.
PROPS = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

EXACT_CTX = Context(prec=400)
FAST_LIMIT = 10**15
SYM = "BTC/USD"
TS = "2026-08-16T23:37:03.745044Z"

_exact_route = wire._decode_book_exact  # the original, before any spy is installed


def dec_ticks(token: str, p: int) -> int:
    """The reference: Decimal(token).scaleb(p), which must be integral."""
    with localcontext(EXACT_CTX):
        v = Decimal(token).scaleb(p)
        assert v == v.to_integral_value(), (token, p)
        return int(v)


def book_frame(bids, asks, symbol: str = SYM, type_: str = "update",
               checksum: int = 3310070434) -> bytes:
    """A real-shaped book frame (the wire's key order, compact) with the given tokens."""
    def side(levels):
        return ",".join(f'{{"price":{p},"qty":{q}}}' for p, q in levels)
    return (f'{{"channel":"book","type":"{type_}","data":[{{"symbol":"{symbol}",'
            f'"bids":[{side(bids)}],"asks":[{side(asks)}],"checksum":{checksum},'
            f'"timestamp":"{TS}"}}]}}').encode()


def decode_spied(frame: bytes, precisions) -> tuple[list[BookUpdate], bool]:
    """decode_book's result and whether it fell back to the exact route."""
    with mock.patch.object(wire, "_decode_book_exact", wraps=_exact_route) as spy:
        got = decode_book(frame, precisions)
    return got, spy.called


def outcome(fn, *args):
    """A result or the WireError class, so two routes can be compared."""
    try:
        return fn(*args)
    except WireError:
        return WireError


def fast_expected(frame: bytes, ticks: list[int]) -> bool:
    """The float fast path's domain (ingest/wire.py docstring), written independently:
    the frame guard passes, every tick is below 10**15, and a zero value is accepted only
    in a frame without exponent notation (0.0 may be an underflow, as in 1e-400)."""
    has_exponent = re.search(rb"[eE][-+.0-9]", frame) is not None
    return (wire._fast_path_allowed(frame) and max(ticks, default=0) < FAST_LIMIT
            and not (0 in ticks and has_exponent))


# --------------------------------------------------------------------------------------
# the real vectors

@needs_vectors
def test_vector_inventory():
    frames = list(vectors.iter_frames())
    kinds: dict[str, int] = {}
    for vf in frames:
        k = vectors.kind_of(vf.frame)
        kinds[k] = kinds.get(k, 0) + 1
    # SOURCES.md: 510 + 30 + 1 + 2 book messages; DepthCharge adds 1 status, 1 ack and
    # 60 heartbeats; its one dir:"tx" line (the subscribe request) is skipped.
    assert kinds == {"book": 543, "heartbeat": 60, "status": 1, "subscribe": 1}
    assert not any(b'"params"' in vf.frame for vf in frames)


@needs_vectors
def test_depthcharge_frames_are_sliced_verbatim():
    path = next(p for p in vectors.vector_files() if p.suffix == ".ndjson")
    text = path.read_bytes()
    meta, frames = vectors.read_file(path)
    assert meta["symbol"] == "MINA/GBP" and meta["depth"] == 25
    for vf in frames:
        assert vf.frame in text  # the exact bytes of the file, not a re-serialisation
        assert vf.frame.startswith(b"{") and vf.frame.endswith(b"}")
    # trailing zeros survive only because nothing went through json.dumps
    assert any(b'"qty":0.00000000' in vf.frame for vf in frames)


@needs_vectors
def test_every_vector_frame_decodes_as_a_message():
    for vf in vectors.iter_frames():
        obj = json.loads(vf.frame)
        m = decode_message(vf.frame)
        kind = vectors.kind_of(vf.frame)
        where = f"{vf.file}:{vf.line}"
        if kind == "book":
            assert m == BookMessage(obj["type"], tuple(d["symbol"] for d in obj["data"])), where
        elif kind == "heartbeat":
            assert m == Heartbeat(), where
        elif kind == "status":
            assert isinstance(m, Status), where
            d = obj["data"][0]
            assert m.data[0].system == d["system"] == "online"
            assert m.data[0].api_version == "v2"
            assert m.data[0].connection_id == d["connection_id"]  # exact, > 2**53
            assert m.data[0].connection_id > 2**53
        elif kind == "subscribe":
            assert isinstance(m, Ack) and m.success, where
            assert m.result is not None
            assert (m.result.channel, m.result.symbol, m.result.depth) == (
                "book", vf.symbol, vf.depth)
        else:
            pytest.fail(f"unexpected frame kind {kind} at {where}")


@needs_vectors
def test_every_vector_book_frame_has_exact_ticks_on_both_routes():
    n = fast = 0
    for vf in vectors.iter_frames():
        if vectors.kind_of(vf.frame) != "book":
            continue
        n += 1
        where = f"{vf.file}:{vf.line}"
        obj = json.loads(vf.frame, parse_float=Decimal, parse_int=Decimal)
        got, took_exact = decode_spied(vf.frame, vf.precisions)
        assert got == _exact_route(vf.frame, vf.precisions), where
        assert len(got) == len(obj["data"])
        ticks: list[int] = []
        for u, d in zip(got, obj["data"], strict=True):
            pp, qp = vf.precisions[d["symbol"]]
            ref = {side: [(dec_ticks(str(lv["price"]), pp), dec_ticks(str(lv["qty"]), qp))
                          for lv in d[side]] for side in ("bids", "asks")}
            assert u.symbol == d["symbol"] == vf.symbol, where
            assert u.snapshot == (obj["type"] == "snapshot"), where
            assert u.bids == ref["bids"] and u.asks == ref["asks"], where
            assert u.checksum == int(d["checksum"]), where
            assert u.timestamp == d.get("timestamp"), where
            ticks += [t for lv in u.bids + u.asks for t in lv]
        # the guard, both ways: the fast path is taken exactly when it is provably exact
        expect_fast = fast_expected(vf.frame, ticks)
        assert took_exact == (not expect_fast), where
        fast += expect_fast
    assert n == 543
    assert fast > 0


@needs_vectors
def test_peeks_on_real_frames():
    for vf in vectors.iter_frames():
        obj = json.loads(vf.frame)
        assert peek_channel(vf.frame) == obj.get("channel"), vf.line
        if obj.get("channel") == "book":
            expected = obj["data"][0]["symbol"]
        elif "result" in obj:
            expected = obj["result"].get("symbol")
        else:
            expected = None
        assert peek_symbol(vf.frame) == expected, vf.line


def test_peeks_on_odd_frames():
    assert peek_channel(b'{"method":"pong"}') is None
    assert peek_channel(b'{"channel":""}') is None
    assert peek_channel(b'{"channel":"heartbeat"}') == "heartbeat"
    assert peek_channel(b'{"channel":"book') is None
    assert peek_symbol(b'{"symbol":"' + b"A" * 40 + b'"}') is None
    assert peek_symbol(b'{"symbol":"BTC/USD') is None
    assert peek_symbol(b'{"data":[{"symbol":"ETH/USD"}]}') == "ETH/USD"


# --------------------------------------------------------------------------------------
# exactness

def test_the_design_example_is_exact():
    token = "1234567890.12345678"
    assert round(float(token) * 10**8) != 123456789012345678  # the float trap is real
    frame = book_frame([("0.1", token)], [(token, "1")])
    assert not wire._fast_path_allowed(frame)
    (u,), took_exact = decode_spied(frame, {SYM: (8, 8)})
    assert took_exact
    assert u.bids == [(10000000, 123456789012345678)]
    assert u.asks == [(123456789012345678, 100000000)]
    assert token_ticks(token, 8) == 123456789012345678


def render(ticks: int, p: int, decimals: int) -> str:
    """`ticks * 10**-p` written with `decimals` (<= p) decimals, no exponent."""
    assert 0 <= decimals <= p and ticks % 10 ** (p - decimals) == 0
    m = ticks // 10 ** (p - decimals)
    if decimals == 0:
        return str(m)
    s = str(m).rjust(decimals + 1, "0")
    return f"{s[:-decimals]}.{s[-decimals:]}"


def needed_decimals(ticks: int, p: int) -> int:
    d = p
    while d and ticks % 10 ** (p - d + 1) == 0:
        d -= 1
    return d


@st.composite
def token_at(draw, p: int, max_digits: int = 20, min_digits: int = 1):
    """(token, ticks): up to `max_digits` significant digits, at most p decimals written,
    sometimes with trailing zeros, integers without a dot, or >= 2**64 ticks."""
    kind = draw(st.sampled_from(["plain", "plain", "plain", "huge"]))
    if kind == "huge":
        ticks = draw(st.integers(2**64, 10**22))
    else:
        nd = draw(st.integers(min_digits, max_digits))
        sig = draw(st.integers(10 ** (nd - 1) if nd > 1 else 0, 10**nd - 1))
        ticks = sig * 10 ** draw(st.integers(0, p))  # trailing zeros in the ticks
    lo = needed_decimals(ticks, p)
    decimals = draw(st.integers(lo, p))  # > lo: trailing zeros written out
    return render(ticks, p, decimals), ticks


@st.composite
def short_token_at(draw, p: int):
    """(token, ticks) inside the fast path's domain: <= 15 characters, ticks < 10**15."""
    ticks = draw(st.integers(0, 10 ** draw(st.integers(1, 14)) - 1))
    token = render(ticks, p, draw(st.integers(needed_decimals(ticks, p), p)))
    if len(token) > 15:
        token = render(ticks, p, needed_decimals(ticks, p))
    if len(token) > 15:  # e.g. 14 digits at 12 decimals: keep the integer digits only
        ticks -= ticks % 10**p
        token = render(ticks, p, needed_decimals(ticks, p))
    return token, ticks


@st.composite
def book_case(draw, max_digits: int = 20, min_digits: int = 1, max_levels: int = 4,
              short: bool = False):
    pp = draw(st.integers(0, 12))
    qp = draw(st.integers(0, 12))
    if short:
        level = st.tuples(short_token_at(pp), short_token_at(qp))
    else:
        level = st.tuples(token_at(pp, max_digits, min_digits),
                          token_at(qp, max_digits, min_digits))
    bids = draw(st.lists(level, max_size=max_levels))
    asks = draw(st.lists(level, min_size=0 if bids else 1, max_size=max_levels))
    type_ = draw(st.sampled_from(["update", "snapshot"]))
    return pp, qp, bids, asks, type_


def check_case(pp, qp, bids, asks, type_) -> bool:
    """Decode a generated frame on both routes, compare with Decimal; returns took_exact."""
    frame = book_frame([(p, q) for (p, _), (q, _) in bids],
                       [(p, q) for (p, _), (q, _) in asks], type_=type_)
    precisions = {SYM: (pp, qp)}
    (u,), took_exact = decode_spied(frame, precisions)
    (e,) = _exact_route(frame, precisions)
    assert u == e
    for got, levels in ((u.bids, bids), (u.asks, asks)):
        assert got == [(pt, qt) for (_, pt), (_, qt) in levels]
        assert got == [(dec_ticks(p, pp), dec_ticks(q, qp)) for (p, _), (q, _) in levels]
    assert u.snapshot == (type_ == "snapshot")
    ticks = [t for (_, a), (_, b) in bids + asks for t in (a, b)]
    assert took_exact == (not fast_expected(frame, ticks))
    return took_exact


@PROPS
@given(book_case())
def test_random_tokens_are_exact_on_both_routes(case):
    check_case(*case)


@PROPS
@given(book_case(short=True))
def test_short_tokens_take_the_fast_path(case):
    pp, qp, bids, asks, type_ = case
    assert all(len(t) <= 15 and n < FAST_LIMIT for lv in bids + asks for t, n in lv)
    assert not check_case(*case)  # provably exact, so the fast path must accept it


@PROPS
@given(book_case(min_digits=16, max_digits=20, max_levels=2))
@example((8, 8, [(("1234567890.12345678", 123456789012345678), ("1", 100000000))], [], "update"))
@example((0, 0, [(("18446744073709551616", 2**64), ("99999999999999999999", 10**20 - 1))], [],
          "snapshot"))
def test_long_tokens_take_the_exact_route(case):
    assert check_case(*case)


@pytest.mark.parametrize("token,p,ticks", [
    ("1e-08", 8, 1), ("5e-05", 8, 5000), ("1.5E2", 1, 1500), ("0e-400", 8, 0),
    ("12345678901234567890e-8", 8, 12345678901234567890), ("1E+20", 0, 10**20),
])
def test_exponent_tokens_are_exact_in_book_frames(token, p, ticks):
    frame = book_frame([("1", token)], [])
    (u,), took_exact = decode_spied(frame, {SYM: (0, p)})
    assert u.bids == [(1, ticks)] == [(1, dec_ticks(token, p))]
    # short mantissa, nonzero, < 10**15 ticks: the fast path keeps it (module docstring)
    assert took_exact == (token not in ("1e-08", "5e-05", "1.5E2"))
    assert took_exact == (not fast_expected(frame, [1, ticks]))


@st.composite
def exp_token_at(draw, p: int):
    """(token, ticks) in exponent notation: mantissa M (sometimes with a dot or trailing
    zeros), exponent E, value ticks * 10**-p; zeros too (0e5, 0.0E-400)."""
    ticks = draw(st.one_of(st.just(0), st.integers(1, 10**18)))
    if ticks == 0:
        return f"0{draw(st.sampled_from(['', '.0']))}e{draw(st.integers(-400, 400))}", 0
    a = draw(st.integers(0, 3))  # M = ticks * 10**a, so E = -(p + a)
    m = str(ticks * 10**a)
    b = draw(st.integers(0, len(m) - 1))  # digits after the dot: E grows by b
    mant = f"{m[:-b]}.{m[-b:]}" if b else m
    e = draw(st.sampled_from(["e", "E"]))
    exp = b - p - a
    return f"{mant}{e}{'+' if exp >= 0 and draw(st.booleans()) else ''}{exp}", ticks


@PROPS
@given(st.data())
def test_exponent_tokens_on_both_routes(data):
    """Exponent notation, zeros included, mixed with plain tokens: exact on both routes,
    and on the fast path exactly when the module docstring says so. (The underflow trap,
    1e-400 decoding to 0.0, is in test_more_decimals_than_the_precision_is_an_error.)"""
    pp = data.draw(st.integers(0, 12))
    qp = data.draw(st.integers(0, 12))
    level = st.tuples(st.one_of(exp_token_at(pp), token_at(pp)),
                      st.one_of(exp_token_at(qp), token_at(qp)))
    bids = data.draw(st.lists(level, min_size=1, max_size=3))
    check_case(pp, qp, bids, [], "update")


@pytest.mark.parametrize("token,p,ticks", [("1.50", 1, 15), ("29431.0", 0, 29431),
                                           ("0.0000", 2, 0), ("7.000000000", 8, 700000000)])
def test_zeros_past_the_precision_are_no_decimals_on_either_route(token, p, ticks):
    frame = book_frame([(token, token)], [])
    precisions = {SYM: (p, p)}
    assert decode_book(frame, precisions) == _exact_route(frame, precisions)
    assert decode_book(frame, precisions)[0].bids == [(ticks, ticks)]
    assert token_ticks(token, p) == ticks


@st.composite
def too_precise(draw):
    """(token, p): a token whose value has more decimals than p."""
    p = draw(st.integers(0, 12))
    form = draw(st.sampled_from(["digits", "digits", "exponent"]))
    if form == "exponent":
        m = draw(st.integers(1, 10**8).filter(lambda m: m % 10))
        k = draw(st.one_of(st.integers(p + 1, p + 30), st.integers(300, 100000)))
        e = draw(st.sampled_from(["e", "E"]))
        return f"{m}{e}-{k}", p
    base, _ = draw(token_at(p))
    if "." not in base:
        base += "."
    base += "0" * (p - len(base.partition(".")[2]))  # exactly p decimals
    return base + "0" * draw(st.integers(0, 12)) + str(draw(st.integers(1, 9))), p


@PROPS
@given(too_precise(), st.booleans())
@example(("0.123456780000000001", 8), True)  # would round to a valid tick
@example(("0.123456780000000001", 8), False)
@example(("1e-400", 8), False)
@example(("1e-9999999", 8), True)
@example(("29430.35", 1), False)
def test_more_decimals_than_the_precision_is_an_error(case, on_price):
    token, p = case
    frame = book_frame([(token, "1")] if on_price else [("1", token)], [])
    precisions = {SYM: (p, p)}
    with pytest.raises(WireError):
        decode_book(frame, precisions)
    with pytest.raises(WireError):
        _exact_route(frame, precisions)
    with pytest.raises(WireError):
        token_ticks(token, p)


@pytest.mark.parametrize("token", ["-1", "-0.5", "-0.00000001", "-1e-8", "-29430.3",
                                   "-12345678901234567890", "-1" + "0" * 5000])
@pytest.mark.parametrize("on_price", [True, False])
def test_negative_numbers_are_errors(token, on_price):
    frame = book_frame([(token, "1")] if on_price else [("1", token)], [])
    precisions = {SYM: (8, 8)}
    with pytest.raises(WireError):
        decode_book(frame, precisions)
    with pytest.raises(WireError):
        _exact_route(frame, precisions)
    with pytest.raises(WireError):
        token_ticks(token, 8)


@PROPS
@given(token_at(8))
def test_negative_tokens_always_error(case):
    token, ticks = case
    frame = book_frame([("-" + token, "1")], [])
    if ticks:
        with pytest.raises(WireError):
            decode_book(frame, {SYM: (8, 8)})
        with pytest.raises(WireError):
            _exact_route(frame, {SYM: (8, 8)})
    else:  # a signed zero is zero, not negative: on both routes
        assert decode_book(frame, {SYM: (8, 8)}) == _exact_route(frame, {SYM: (8, 8)})


@pytest.mark.parametrize("token", ["-0", "-0.0", "-0.00000000", "-0e5", "-0.0E-3"])
def test_a_signed_zero_is_zero_on_both_routes(token):
    """msgspec decodes the integer token -0 as +0.0, so the fast path cannot see its sign;
    the exact route must agree that its value is 0 (a delete when it is a qty)."""
    frame = book_frame([("1", token)], [])
    precisions = {SYM: (1, 8)}
    assert decode_book(frame, precisions) == _exact_route(frame, precisions)
    assert decode_book(frame, precisions)[0].bids == [(10, 0)]
    assert token_ticks(token, 8) == 0
    for bad in ("--0", "-", "-.0", "-e5", "+0"):
        with pytest.raises(WireError):
            token_ticks(bad, 8)


@pytest.mark.parametrize("token", ["1" + "0" * 5000, "1e999999999", "1e9999999", "9e400000"])
def test_absurdly_large_tokens_are_wire_errors(token):
    with pytest.raises(WireError):
        decode_book(book_frame([("1", token)], []), {SYM: (0, 8)})
    with pytest.raises(WireError):
        token_ticks(token, 8)


def test_book_frame_errors():
    good = book_frame([("1.5", "2")], [])
    assert decode_book(good, {SYM: (1, 0)})[0].bids == [(15, 2)]
    with pytest.raises(WireError, match="precision"):
        decode_book(good, {"ETH/USD": (1, 0)})
    with pytest.raises(WireError, match="type"):
        decode_book(book_frame([("1.5", "2")], [], type_="delta"), {SYM: (1, 0)})
    for bad in (b"", b"[]", b"{}", b'{"channel":"book"}', good[:-3], b'{"type":"update","data":5}',
                good.replace(b'"price":1.5', b'"price":"1.5"'),
                good.replace(b'"price":1.5', b'"price":null'),
                good.replace(b'"price":1.5', b'"price":true')):
        with pytest.raises(WireError):
            decode_book(bad, {SYM: (1, 0)})
        with pytest.raises(WireError):
            _exact_route(bad, {SYM: (1, 0)})


def test_precision_out_of_the_float_table_uses_the_exact_route():
    frame = book_frame([("1.5", "2")], [])
    for precisions in ({SYM: (23, 0)}, {SYM: (1, 30)}):
        (u,), took_exact = decode_spied(frame, precisions)
        pp, qp = precisions[SYM]
        assert took_exact and u.bids == [(15 * 10 ** (pp - 1), 2 * 10**qp)]
    with pytest.raises(WireError):
        decode_book(frame, {SYM: (-1, 0)})
    assert token_ticks("1.5", 70) == 15 * 10**69


# --------------------------------------------------------------------------------------
# robustness: only WireError, ever

def _all_decoders(frame: bytes, precisions) -> None:
    fast = outcome(decode_book, frame, precisions)
    exact = outcome(_exact_route, frame, precisions)
    assert fast == exact  # the routes agree on everything, garbage included
    outcome(decode_message, frame)
    assert peek_channel(frame) is None or isinstance(peek_channel(frame), str)
    assert peek_symbol(frame) is None or isinstance(peek_symbol(frame), str)


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_raise_only_wire_error(data):
    _all_decoders(data, {SYM: (1, 8), "MINA/GBP": (4, 8)})


_REAL = [vf for vf in vectors.iter_frames()] if vectors.available() else []
_SEEDS = [vf.frame for vf in _REAL if vectors.kind_of(vf.frame) == "book"][:40] + [
    vf.frame for vf in _REAL if vectors.kind_of(vf.frame) != "book"][:4] + [
    b'{"method":"pong","req_id":101,"time_in":"2023-09-24T14:10:23.799685Z"}',
    b'{"Error":"Exceeded msg rate"}',
    b'{"channel":"trade","type":"update","data":[{"symbol":"MATIC/USD","side":"sell",'
    b'"price":0.5117,"qty":40.0,"ord_type":"market","trade_id":4665906,'
    b'"timestamp":"2023-09-25T07:49:37.708706Z"}]}',
] or [book_frame([("1.5", "2")], [])]

_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6),
              st.sampled_from([b"-", b"e", b"E+9", b"0", b"9" * 20, b".", b",", b"}", b"]",
                               b'"', b"\\", b"\xff", b"1e-400", b" ", b"null", b"[{"])),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 8)),
)


def mutate(frame: bytes, ops) -> bytes:
    b = bytearray(frame)
    for op, i, arg in ops:
        i = i % (len(b) + 1)
        if op == "flip" and b:
            b[i % len(b)] = arg
        elif op == "truncate":
            del b[i:]
        elif op == "insert":
            b[i:i] = arg
        elif op == "delete":
            del b[i:i + arg]
    return bytes(b)


@FUZZ
@given(st.sampled_from(_SEEDS), st.lists(_mutation, min_size=1, max_size=4))
def test_mutated_real_frames_raise_only_wire_error(frame, ops):
    _all_decoders(mutate(frame, ops), {SYM: (1, 8), "MINA/GBP": (4, 8), "MATIC/USD": (4, 8)})


# --------------------------------------------------------------------------------------
# decode_message: the session's frames (PROTOCOL.md sections 1-2)

def test_real_status_keeps_a_u64_connection_id():
    frame = (b'{"channel":"status","type":"update","data":[{"version":"2.0.10","system":"online",'
             b'"api_version":"v2","connection_id":15113583034416118705}]}')
    m = decode_message(frame)
    assert isinstance(m, Status) and m.type == "update"
    (d,) = m.data
    assert d.connection_id == 15113583034416118705 and type(d.connection_id) is int
    assert float(d.connection_id) != d.connection_id  # a double would have corrupted it
    assert (d.system, d.api_version, d.version) == ("online", "v2", "2.0.10")
    with pytest.raises(WireError):
        decode_message(b'{"channel":"status","type":"update","data":[]}')


def test_heartbeat():
    assert decode_message(b'{"channel":"heartbeat"}') == Heartbeat()


@pytest.mark.parametrize("frame,expected", [
    (b'{"method":"subscribe","result":{"channel":"book","depth":25,"snapshot":true,'
     b'"symbol":"BTC/USD"},"success":true,"time_in":"2026-08-16T23:37:03.374788Z",'
     b'"time_out":"2026-08-16T23:37:03.374824Z"}',
     Ack("subscribe", True, wire.AckResult("book", "BTC/USD", 25, None, True))),
    (b'{"method":"unsubscribe","result":{"channel":"book","depth":25,"symbol":"MINA/GBP"},'
     b'"success":true,"time_in":"2026-08-18T20:44:29.766514Z",'
     b'"time_out":"2026-08-18T20:44:29.766559Z"}',
     Ack("unsubscribe", True, wire.AckResult("book", "MINA/GBP", 25, None, None))),
    (b'{"error":"Subscription depth not supported","method":"subscribe","success":false,'
     b'"time_in":"2026-08-16T23:54:19.629313Z","time_out":"2026-08-16T23:54:19.629343Z"}',
     Ack("subscribe", False, None, "Subscription depth not supported")),
    (b'{"error": "Currency pair not supported XBT/USD", "method": "subscribe", '
     b'"success": false, "symbol": "XBT/USD"}',
     Ack("subscribe", False, None, "Currency pair not supported XBT/USD", None, "XBT/USD")),
    (b'{"method":"subscribe","result":{"channel":"ohlc","interval":5,"snapshot":true,'
     b'"symbol":"ALGO/USD","warnings":["timestamp is deprecated, use interval_begin"]},'
     b'"success":true,"time_in":"2023-10-04T16:26:01.802708Z",'
     b'"time_out":"2023-10-04T16:26:01.802791Z"}',
     Ack("subscribe", True, wire.AckResult("ohlc", "ALGO/USD", None, 5, True,
                                           ("timestamp is deprecated, use interval_begin",)))),
    (b'{"method":"subscribe","req_id":79,"result":{"channel":"instrument","snapshot":true,'
     b'"warnings":["tick_size is deprecated, use price_increment"]},"success":true}',
     Ack("subscribe", True, wire.AckResult("instrument", None, None, None, True,
                                           ("tick_size is deprecated, use price_increment",)),
         None, 79)),
    (b'{"Error":"Exceeded msg rate"}', ErrorFrame("Exceeded msg rate")),
    (b'{"error":"Malformed request","method":"error"}', ErrorFrame("Malformed request")),
    (b'{"error":"Malformed request","method":"error","req_id":7}',
     ErrorFrame("Malformed request", 7)),
    (b'{"method":"pong","req_id":101,"time_in":"2023-09-24T14:10:23.799685Z",'
     b'"time_out":"2023-09-24T14:10:23.799703Z"}', Pong(101)),
    (b'{"method":"pong"}', Pong(None)),
])
def test_session_frames(frame, expected):
    m = decode_message(frame)
    assert m == expected and type(m) is type(expected)


def test_refused_depth_has_no_symbol_and_must_be_checked():
    m = decode_message(b'{"error":"Subscription depth not supported","method":"subscribe",'
                       b'"success":false}')
    assert isinstance(m, Ack) and not m.success and m.result is None and m.symbol is None


def test_instrument_with_exponent_notation():
    pair = (b'{"symbol":"BTC/USD","base":"BTC","quote":"USD","status":"online","qty_precision":8,'
            b'"qty_increment":1e-08,"price_precision":1,"cost_precision":5,'
            b'"ws_display_price_precision":1,"cost_min":0.5,"tick_size":0.1,'
            b'"price_increment":0.1,"qty_min":5e-05}')
    frame = b'{"channel":"instrument","type":"snapshot","data":{"assets":[],"pairs":[' + pair + b"]}}"
    m = decode_message(frame)
    assert isinstance(m, InstrumentMessage) and m.type == "snapshot"
    (p,) = m.pairs
    assert (p.symbol, p.base, p.quote, p.status) == ("BTC/USD", "BTC", "USD", "online")
    assert (p.price_precision, p.qty_precision) == (1, 8)
    assert (p.qty_increment, p.price_increment, p.qty_min) == ("0.00000001", "0.1", "0.00005")
    update = (b'{"channel":"instrument","type":"update","data":{"assets":[{"id":"BTC",'
              b'"status":"enabled","precision":10,"precision_display":5,"borrowable":true,'
              b'"collateral_value":1.0,"margin_rate":0.01}],"pairs":[]}}')
    assert decode_message(update) == InstrumentMessage("update", [])


def test_trade_docs_example_keeps_decimal_strings():
    # PROTOCOL.md 2.4, whitespace outside strings removed, number tokens untouched
    frame = (b'{"channel":"trade","type":"update","data":[{"symbol":"MATIC/USD","side":"sell",'
             b'"price":0.5117,"qty":40.0,"ord_type":"market","trade_id":4665906,'
             b'"timestamp":"2023-09-25T07:49:37.708706Z"}]}')
    m = decode_message(frame)
    assert isinstance(m, TradeMessage) and m.type == "update"
    (t,) = m.data
    assert (t.symbol, t.side, t.price, t.qty, t.ord_type, t.trade_id, t.timestamp) == (
        "MATIC/USD", "sell", "0.5117", "40.0", "market", 4665906, "2023-09-25T07:49:37.708706Z")


def test_trade_prices_are_exact_text_whatever_their_digits():
    frame = (b'{"channel":"trade","type":"snapshot","data":[{"symbol":"PEPE/USD","side":"buy",'
             b'"price":0.00000123400,"qty":1234567890.12345678,"ord_type":"limit",'
             b'"trade_id":1,"timestamp":"2023-09-25T07:49:37.708706Z"}]}')
    (t,) = decode_message(frame).data
    assert (t.price, t.qty) == ("0.00000123400", "1234567890.12345678")


def test_ohlc_docs_example():
    frame = (b'{"channel":"ohlc","type":"update","timestamp":"2023-10-04T16:26:30.524394914Z",'
             b'"data":[{"symbol":"MATIC/USD","open":0.5624,"high":0.5628,"low":0.5622,'
             b'"close":0.5627,"trades":12,"volume":30927.68066226,"vwap":0.5626,'
             b'"interval_begin":"2023-10-04T16:25:00.000000000Z","interval":5,'
             b'"timestamp":"2023-10-04T16:30:00.000000Z"}]}')
    m = decode_message(frame)
    assert isinstance(m, OhlcMessage) and m.type == "update"
    (c,) = m.data
    assert (c.symbol, c.open, c.high, c.low, c.close, c.vwap, c.volume) == (
        "MATIC/USD", "0.5624", "0.5628", "0.5622", "0.5627", "0.5626", "30927.68066226")
    assert (c.trades, c.interval, c.interval_begin) == (12, 5, "2023-10-04T16:25:00.000000000Z")
    assert decode_message(frame.replace(b'"trades":12', b'"trades":12.0')).data[0].trades == 12
    with pytest.raises(WireError):
        decode_message(frame.replace(b'"trades":12', b'"trades":12.5'))
    with pytest.raises(WireError):
        decode_message(frame.replace(b'"trades":12', b'"trades":1' + b"0" * 5000))


@pytest.mark.parametrize("frame", [
    b'{"channel":"level3","type":"update","data":[]}',
    b'{"channel":"executions","type":"snapshot","data":[]}',
    b'{"method":"frobnicate"}',
    b'{"time_in":"2023-09-24T14:10:23.799685Z"}',
    b'{"method":"subscribe","success":false}',
    b'{"channel":"book","type":"delta","data":[{"symbol":"BTC/USD"}]}',
    b'{"channel":"trade","type":"update","data":[{"symbol":"X/Y"}]}',
    b'{"channel":"trade","type":"update","data":[{"symbol":"MATIC/USD","side":"sell",'
    b'"price":1e999999999,"qty":1,"ord_type":"market","trade_id":1,"timestamp":"t"}]}',
    b'[1,2]', b'"text"', b'', b'{', b'\xff\xfe',
])
def test_unknown_or_malformed_messages_are_wire_errors(frame):
    with pytest.raises(WireError):
        decode_message(frame)
