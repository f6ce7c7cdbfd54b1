"""The bus event contract (bus/schema.py): round trips, schemas, exact ticks, topics, CLI."""

from __future__ import annotations

import ast
import calendar
import json
import re
import subprocess
import sys
import zlib
from decimal import Decimal, localcontext
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bus import schema
from bus.schema import (
    EVENT_TYPES,
    SCHEMA_VERSION,
    U64_MAX,
    HaltDecision,
    HaltTrigger,
    MarketDataL2Event,
    MarketDataL2EventTicks,
    MarketDataOHLCVEvent,
    MarketDataTradeEvent,
    PotentialHaltTriggerEvent,
    SchemaError,
    StatsEvent,
    SystemStateEvent,
    TickOverflowError,
    decimal_to_ticks,
    decode_envelope_json,
    decode_envelope_msgpack,
    encode_envelope_json,
    encode_envelope_msgpack,
    frame,
    l2_from_ticks,
    l2_to_ticks,
    make_envelope,
    ns_to_rfc3339,
    parse_topic,
    rfc3339_to_ns,
    split_frame,
    subscription_prefix,
    ticks_to_decimal,
    topic_for,
)

REPO = Path(__file__).resolve().parents[2]

# Kraken's documented checksum example (BTC/USD depth 10, checksum 3310070434).
BIDS = [("45283.5", "0.10000000"), ("45283.4", "1.54582015"), ("45282.1", "0.10000000"),
        ("45281.0", "0.10000000"), ("45280.3", "1.54592586"), ("45279.0", "0.07990000"),
        ("45277.6", "0.03310103"), ("45277.5", "0.30000000"), ("45277.3", "1.54602737"),
        ("45276.6", "0.15445238")]
ASKS = [("45285.2", "0.00100000"), ("45286.4", "1.54571953"), ("45286.6", "1.54571109"),
        ("45289.6", "1.54560911"), ("45290.2", "0.15890660"), ("45291.8", "1.54553491"),
        ("45294.7", "0.04454749"), ("45296.1", "0.35380000"), ("45297.5", "0.09945542"),
        ("45299.5", "0.18772827")]

L2 = MarketDataL2Event(
    pair="BTC/USD", timestamp="2023-10-06T17:35:55.440295Z", bids=BIDS, asks=ASKS,
    checksum=3310070434, conn_id=1, exchange_ts_ns=1696613755440295000,
    recv_ns=1696613755442107345, snapshot=True, depth=10, price_precision=1,
    qty_precision=8)
TRADE = MarketDataTradeEvent(
    pair="MATIC/USD", trade_id=4665906, side="sell", price="0.5117", qty="40.0",
    ord_type="market", timestamp="2023-09-25T07:49:37.708706Z", recv_ns=1695628177709912004)
OHLC = MarketDataOHLCVEvent(
    pair="MATIC/USD", interval="5m", timestamp="2023-10-04T16:25:00.000000000Z",
    open="0.5624", high="0.5628", low="0.5622", close="0.5627", volume="30927.68066226",
    vwap="0.5626", count=12, closed=False, recv_ns=1696436790524394914)
SYSTEM = SystemStateEvent(timestamp="2026-08-16T23:37:03.402652000Z", service_name="ingest",
                          status_code="online", status_message="Kraken engine online (2.0.10)")
TRIGGER = PotentialHaltTriggerEvent(
    timestamp="2026-08-16T23:40:00.000000000Z", source_module="bookd",
    error_code="CHECKSUM_MISMATCHES", reason="5 checksum mismatches in 60 s",
    details="last: local 1234 != exchange 4249465476", pair="BTC/USD")
STATS = StatsEvent(timestamp="2026-08-16T23:37:10.000000000Z", process="ingest", pid=4242,
                   counters={"frames": 1830, "decode_errors": 0, "drops": 0},
                   gauges={"queue_depth": 3.0, "lag_ms": 0.4})
HALT = HaltDecision(
    timestamp="2026-08-16T23:40:00.500000000Z", reason="checksum mismatches on BTC/USD",
    triggers=[HaltTrigger(source="bookd", error_code="CHECKSUM_MISMATCHES",
                          reason="5 checksum mismatches in 60 s", pair="BTC/USD",
                          at="2026-08-16T23:40:00.000000000Z")],
    stopped=["ingest", "bookd", "bus"])
JSON_EVENTS = [L2, TRADE, OHLC, SYSTEM, TRIGGER, STATS, HALT]
MSGPACK_EVENTS = [l2_to_ticks(L2), *JSON_EVENTS[1:]]


def envelope(event, seq=1):
    return make_envelope(event, epoch=2**63 + 17, seq=seq, pub_ns=1696613755443000000)


# --- purity -----------------------------------------------------------------------------
def test_module_is_pure():
    forbidden = {"asyncio", "zmq", "picows", "socket", "time", "multiprocessing"}
    tree = ast.parse((REPO / "bus" / "schema.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported, "the AST walk found no imports at all"
    assert not {name.split(".")[0] for name in imported} & forbidden


# --- round trips ------------------------------------------------------------------------
@pytest.mark.parametrize("event", JSON_EVENTS, ids=lambda e: type(e).__name__)
def test_json_envelope_round_trip(event):
    env = envelope(event, seq=7)
    payload = encode_envelope_json(env)
    got_env, got_event = decode_envelope_json(payload)
    assert got_event == event and type(got_event) is type(event)
    assert got_env == env
    raw = json.loads(payload)
    assert list(raw) == ["v", "topic", "epoch", "seq", "pub_ns", "type", "event"]
    assert raw["v"] == SCHEMA_VERSION and raw["type"] == type(event).__name__
    assert raw["topic"] == topic_for(event)


@pytest.mark.parametrize("event", MSGPACK_EVENTS, ids=lambda e: type(e).__name__)
def test_msgpack_envelope_round_trip(event):
    env = envelope(event, seq=3)
    got_env, got_event = decode_envelope_msgpack(encode_envelope_msgpack(env))
    assert got_env == env and got_event == event and type(got_event) is type(event)


def test_json_values_are_decimal_strings_never_floats():
    for event in (L2, TRADE, OHLC):
        raw = json.loads(encode_envelope_json(envelope(event)), parse_float=Decimal)
        strings = [*raw["event"].get("bids", ()), *raw["event"].get("asks", ())]
        strings = [x for level in strings for x in level] + [
            raw["event"][k] for k in ("price", "qty", "open", "high", "low", "close",
                                      "volume", "vwap") if k in raw["event"]]
        assert strings and all(isinstance(x, str) for x in strings)
    assert b'["45285.2","0.00100000"]' in encode_envelope_json(envelope(L2))


def test_book_ticks_form_for_msgpack():
    ticks = l2_to_ticks(L2)
    assert ticks.bids[0] == (452835, 10000000) and ticks.asks[0] == (452852, 100000)
    assert (ticks.price_precision, ticks.qty_precision, ticks.checksum) == (1, 8, 3310070434)
    assert l2_from_ticks(ticks) == L2
    _, decoded = decode_envelope_msgpack(encode_envelope_msgpack(envelope(ticks)))
    assert l2_from_ticks(decoded) == L2
    # Each form travels only on its own socket.
    with pytest.raises(SchemaError):
        encode_envelope_msgpack(envelope(L2))
    with pytest.raises(SchemaError):
        encode_envelope_json(envelope(ticks))


def test_book_ticks_at_uint64_limit_and_beyond():
    big = msgspec.structs.replace(L2, bids=[(str(U64_MAX), "1.00000000")], asks=[],
                                  price_precision=0)
    ticks = l2_to_ticks(big)
    assert ticks.bids == [(U64_MAX, 100000000)]
    assert decode_envelope_msgpack(encode_envelope_msgpack(envelope(ticks)))[1] == ticks
    with pytest.raises(TickOverflowError):
        # 10 * (2**64 - 1) ticks cannot be represented
        l2_to_ticks(msgspec.structs.replace(big, bids=[(str(U64_MAX) + ".0", "1.00000000")],
                                            price_precision=1))
    with pytest.raises(SchemaError):
        # "45283.5" has more decimals than precision 0
        l2_to_ticks(msgspec.structs.replace(L2, price_precision=0))


def test_decode_is_tolerant_of_additions_and_strict_on_contract():
    raw = json.loads(encode_envelope_json(envelope(TRADE)))
    raw["event"]["added_later"] = 1
    raw["added_later"] = "x"
    assert decode_envelope_json(json.dumps(raw).encode())[1] == TRADE
    for key, value in (("type", "NoSuchEvent"), ("v", SCHEMA_VERSION + 1)):
        with pytest.raises(SchemaError):
            decode_envelope_json(json.dumps({**raw, key: value}).encode())
    raw["event"]["side"] = "short"
    with pytest.raises(msgspec.ValidationError):
        decode_envelope_json(json.dumps(raw).encode())


def test_events_are_frozen():
    with pytest.raises(AttributeError):
        L2.pair = "ETH/USD"  # type: ignore[misc]


# --- schema -----------------------------------------------------------------------------
def _check(value, node, root, path="$"):
    """A minimal JSON Schema checker for the keywords msgspec emits; unknown ones fail."""
    annotations = {"title", "description", "default", "examples", "format", "$defs"}
    types = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
             "array": list, "object": dict, "null": type(None)}
    kinds = {"required": dict, "minimum": (int, float), "maximum": (int, float),
             "minItems": list, "maxItems": list, "pattern": str, "prefixItems": list}
    if node is False:
        raise AssertionError(f"{path}: no value allowed here")
    for key, arg in node.items():
        if key in annotations or key in ("properties", "additionalProperties", "items"):
            continue
        if key == "$ref":
            _check(value, root["$defs"][arg.rsplit("/", 1)[1]], root, path)
        elif key == "type":
            ok = isinstance(value, types[arg]) and not (
                arg in ("integer", "number") and isinstance(value, bool))
            assert ok, f"{path}: {value!r} is not {arg}"
        elif key == "anyOf":
            errors = []
            for option in arg:
                try:
                    _check(value, option, root, path)
                    break
                except AssertionError as exc:
                    errors.append(str(exc))
            else:
                raise AssertionError(f"{path}: no anyOf option matches: {errors}")
        elif key == "enum":
            assert value in arg, f"{path}: {value!r} not in {arg}"
        elif key == "required":
            assert not set(arg) - set(value), f"{path}: missing {set(arg) - set(value)}"
        elif key in ("required", "minimum", "maximum", "minItems", "maxItems", "pattern",
                     "prefixItems") and not isinstance(value, kinds[key]):
            continue  # JSON Schema: these keywords constrain only their own JSON type
        elif key == "minimum":
            assert value >= arg, f"{path}: {value} < {arg}"
        elif key == "maximum":
            assert value <= arg, f"{path}: {value} > {arg}"
        elif key == "minItems":
            assert len(value) >= arg, f"{path}: too few items"
        elif key == "maxItems":
            assert len(value) <= arg, f"{path}: too many items"
        elif key == "pattern":
            assert re.search(arg, value), f"{path}: {value!r} does not match {arg}"
        elif key == "prefixItems":
            for i, (item, sub) in enumerate(zip(value, arg, strict=False)):
                _check(item, sub, root, f"{path}[{i}]")
        else:
            raise AssertionError(f"checker does not know keyword {key!r}")
    if isinstance(value, dict):
        props = node.get("properties", {})
        extra = node.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                _check(v, props[k], root, f"{path}.{k}")
            elif extra is not True:
                _check(v, extra, root, f"{path}.{k}")
    if isinstance(value, list) and "items" in node:
        for i, item in enumerate(value[len(node.get("prefixItems", ())):]):
            _check(item, node["items"], root, f"{path}[{i}]")


def _payloads():
    for event in JSON_EVENTS:
        yield json.loads(encode_envelope_json(envelope(event)))
    for event in MSGPACK_EVENTS[:1]:
        yield msgspec.msgpack.decode(encode_envelope_msgpack(envelope(event)))


def test_schema_document_lists_every_event_with_required_fields():
    doc = schema.json_schema_document()
    assert doc["schema_version"] == SCHEMA_VERSION
    assert set(doc["events"]) == set(EVENT_TYPES) >= {
        "MarketDataL2Event", "MarketDataL2EventTicks", "MarketDataTradeEvent",
        "MarketDataOHLCVEvent", "SystemStateEvent", "PotentialHaltTriggerEvent",
        "StatsEvent", "HaltDecision"}
    for name, cls in EVENT_TYPES.items():
        body = doc["events"][name]["$defs"][name]
        fields = msgspec.structs.fields(cls)
        assert set(body["properties"]) == {f.name for f in fields}
        assert set(body["required"]) == {f.name for f in fields if f.required}
    env = doc["envelope"]["$defs"]["Envelope"]
    assert set(env["required"]) == {"v", "topic", "epoch", "seq", "pub_ns", "type", "event"}
    l2 = doc["events"]["MarketDataL2Event"]["$defs"]["MarketDataL2Event"]
    assert {"pair", "timestamp", "bids", "asks", "checksum", "conn_id", "exchange_ts_ns",
            "recv_ns", "snapshot", "depth"} <= set(l2["required"])


def test_every_payload_validates_against_generated_schema():
    doc = schema.json_schema_document()
    for raw in _payloads():
        _check(raw, doc["envelope"], doc["envelope"])
        event_schema = doc["events"][raw["type"]]
        _check(raw["event"], event_schema, event_schema)
    # The checker is not vacuous: a float price and a missing field are both caught.
    bad = json.loads(encode_envelope_json(envelope(L2)))["event"]
    bad["bids"][0][0] = 45283.5
    l2_schema = doc["events"]["MarketDataL2Event"]
    with pytest.raises(AssertionError, match="not string"):
        _check(bad, l2_schema, l2_schema)
    del bad["checksum"]
    with pytest.raises(AssertionError, match="missing"):
        _check(bad, l2_schema, l2_schema)


def test_payloads_validate_with_jsonschema():
    jsonschema = pytest.importorskip("jsonschema")
    doc = schema.json_schema_document()
    for raw in _payloads():
        jsonschema.Draft202012Validator(doc["envelope"]).validate(raw)
        jsonschema.Draft202012Validator(doc["events"][raw["type"]]).validate(raw["event"])


def test_cli_prints_one_json_document():
    out = subprocess.run([sys.executable, "-m", "bus.schema", "--json-schema"], cwd=REPO,
                         capture_output=True, text=True, check=True, timeout=60)
    doc = json.loads(out.stdout)
    assert doc == json.loads(json.dumps(schema.json_schema_document()))
    assert set(doc["events"]) == set(EVENT_TYPES)
    helped = subprocess.run([sys.executable, "-m", "bus.schema", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--json-schema" in helped.stdout


# --- exact decimal <-> ticks ------------------------------------------------------------
@pytest.mark.parametrize(("text", "precision", "ticks"), [
    ("123.45", 2, 12345), ("0.00005100", 8, 5100), ("62807.0", 1, 628070),
    ("62807", 1, 628070), ("0.00000000", 8, 0), ("1234567890.12345678", 8, 123456789012345678),
    ("0", 0, 0), ("007.5", 1, 75),
])
def test_decimal_ticks_examples(text, precision, ticks):
    assert decimal_to_ticks(text, precision) == (ticks, precision)


def test_ticks_to_decimal_examples():
    assert ticks_to_decimal(12345, 2) == "123.45"
    assert ticks_to_decimal(5100, 8) == "0.00005100"
    assert ticks_to_decimal(628070, 1) == "62807.0"
    assert ticks_to_decimal(0, 8) == "0.00000000"
    assert ticks_to_decimal(42, 0) == "42"
    assert decimal_to_ticks("0.00005100") == (5100, 8)  # precision from the digits
    with pytest.raises(SchemaError):
        ticks_to_decimal(-1, 2)


@pytest.mark.parametrize("text", [
    "1e-8", "5.1e-05", "-1", "+1", "1.", ".5", "", " 1", "1 ", "1_000", "1.2.3", "NaN",
    "\u0661", "1.\u0662", "0x10",
])
def test_decimal_to_ticks_rejects_non_plain_decimals(text):
    with pytest.raises(SchemaError):
        decimal_to_ticks(text, 8)


def test_more_decimals_than_precision_is_an_error_not_a_rounding():
    with pytest.raises(SchemaError):
        decimal_to_ticks("0.123", 2)
    with pytest.raises(SchemaError):
        decimal_to_ticks("1.0", 0)


@given(digits=st.integers(min_value=0, max_value=10**20 - 1),
       shift=st.integers(min_value=0, max_value=12), precision=st.integers(0, 12))
def test_decimal_ticks_exact_against_decimal(digits, shift, precision):
    # Up to 20 significant digits with `shift` of them after the point.
    shift = min(shift, precision)
    with localcontext(prec=100):  # exact: 20 digits + 12 decimals exceed the default 28
        value = Decimal(digits).scaleb(-shift)
        text = format(value.quantize(Decimal(1).scaleb(-precision)), "f")
        expected = int(value.scaleb(precision))
    assert decimal_to_ticks(text, precision) == (expected, precision)
    assert ticks_to_decimal(expected, precision) == text
    assert Decimal(text) == value


@given(ticks=st.integers(min_value=0, max_value=2**80), precision=st.integers(0, 12))
def test_ticks_round_trip_including_beyond_uint64(ticks, precision):
    text = ticks_to_decimal(ticks, precision)
    assert Decimal(text) == Decimal(ticks).scaleb(-precision)
    assert decimal_to_ticks(text, precision) == (ticks, precision)
    assert decimal_to_ticks(text) == (ticks, precision)


levels = st.lists(st.tuples(st.integers(0, U64_MAX), st.integers(0, U64_MAX)), max_size=5)


@given(bids=levels, asks=levels, pp=st.integers(0, 12), qp=st.integers(0, 12))
def test_l2_both_encodings_round_trip(bids, asks, pp, qp):
    def dec(side):
        return [(ticks_to_decimal(p, pp), ticks_to_decimal(q, qp)) for p, q in side]
    event = msgspec.structs.replace(L2, bids=dec(bids), asks=dec(asks), price_precision=pp,
                                    qty_precision=qp)
    assert decode_envelope_json(encode_envelope_json(envelope(event)))[1] == event
    ticks = l2_to_ticks(event)
    assert (ticks.bids, ticks.asks) == (bids, asks)
    got = decode_envelope_msgpack(encode_envelope_msgpack(envelope(ticks)))[1]
    assert isinstance(got, MarketDataL2EventTicks) and l2_from_ticks(got) == event


# --- topics and frames ------------------------------------------------------------------
def test_topic_for_every_event():
    expected = ["book.BTC/USD", "trade.MATIC/USD", "ohlc.5m.MATIC/USD", "system", "trigger",
                "stats", "halt"]
    assert [topic_for(e) for e in JSON_EVENTS] == expected
    assert topic_for(MSGPACK_EVENTS[0]) == "book.BTC/USD"
    assert {type(e) for e in JSON_EVENTS + MSGPACK_EVENTS} == set(EVENT_TYPES.values())
    with pytest.raises(SchemaError):
        topic_for(HALT.triggers[0])


def test_topic_helpers_and_parse():
    assert schema.book_topic("BTC/USD") == "book.BTC/USD"
    assert schema.trade_topic("ETH/EUR") == "trade.ETH/EUR"
    assert schema.ohlc_topic("1h", "BTC/USD") == "ohlc.1h.BTC/USD"
    assert parse_topic("ohlc.15d.BTC/USD") == ("ohlc", "15d", "BTC/USD")
    assert parse_topic("book.BTC/USDT") == ("book", None, "BTC/USDT")
    assert parse_topic("stats") == ("stats", None, None)
    for bad in ("ohlc.2m.BTC/USD", "book.", "candle.BTC/USD", "system.x", "book.BTC /USD"):
        with pytest.raises(SchemaError):
            parse_topic(bad)
    with pytest.raises(SchemaError):
        schema.book_topic("BTC USD")
    with pytest.raises(SchemaError):
        schema.ohlc_topic("2m", "BTC/USD")


def test_ohlc_intervals_match_the_config_vocabulary():
    from ingest.config import INTERVAL_MINUTES
    assert tuple(INTERVAL_MINUTES) == schema.OHLC_INTERVALS


def test_subscription_prefix_isolates_one_pair():
    prefix = subscription_prefix("book.BTC/USD")
    assert prefix == b"book.BTC/USD "
    usdt = frame("book.BTC/USDT", b"{}")
    assert not usdt.startswith(prefix)
    assert frame("book.BTC/USD", b"{}").startswith(prefix)
    assert usdt.startswith(b"book.")  # the all-books prefix still gets both


def test_frame_split_round_trip():
    payload = encode_envelope_json(envelope(SYSTEM))
    assert b" " in payload  # spaces inside the payload must not confuse split_frame
    msg = frame(topic_for(SYSTEM), payload)
    assert msg == b"system " + payload
    assert split_frame(msg) == ("system", payload)
    assert split_frame(memoryview(msg)) == ("system", payload)
    for bad in (b"system", b" payload", b""):
        with pytest.raises(SchemaError):
            split_frame(bad)
    with pytest.raises(SchemaError):
        frame("bad topic", b"{}")


# --- vocabulary and time ----------------------------------------------------------------
def test_status_code_vocabulary():
    assert schema.CONNECTION_STATES == ("CONNECTED", "DISCONNECTED", "RECONNECTING", "ERROR",
                                        "STALE")
    assert set(schema.ENGINE_STATES) == {"online", "maintenance", "cancel_only", "post_only"}
    assert set(schema.INSTRUMENT_STATES) == {
        "online", "cancel_only", "post_only", "limit_only", "reduce_only", "maintenance",
        "delisted", "work_in_progress"}
    assert {"RESYNCING", "VALID", "HALTED", "INTEGRITY"} == set(schema.BOOK_STATES)
    assert schema.STATUS_CODES == set(schema.CONNECTION_STATES + schema.BOOK_STATES
                                      + schema.ENGINE_STATES + schema.INSTRUMENT_STATES)
    assert SYSTEM.status_code in schema.STATUS_CODES


def test_rfc3339_to_ns():
    base = calendar.timegm((2023, 10, 4, 16, 25, 0)) * 10**9
    assert rfc3339_to_ns("2023-10-04T16:25:00.000000000Z") == base
    assert rfc3339_to_ns("2023-10-04T16:25:00Z") == base
    assert rfc3339_to_ns("2023-10-04T16:25:00.123456789123Z") == base + 123456789
    assert rfc3339_to_ns("2023-10-04T18:25:00.5+02:00") == base + 500_000_000
    assert rfc3339_to_ns(L2.timestamp) == L2.exchange_ts_ns
    for bad in ("2023-10-04 16:25:00Z", "2023-10-04T16:25:00", "2023-13-04T16:25:00Z", ""):
        with pytest.raises(SchemaError):
            rfc3339_to_ns(bad)


@given(st.integers(min_value=0, max_value=4_102_444_800 * 10**9))
def test_ns_rfc3339_round_trip(ns):
    text = ns_to_rfc3339(ns)
    assert text.endswith("Z") and len(text) == 30
    assert rfc3339_to_ns(text) == ns


# --- the documentation's examples are real payloads -------------------------------------
def test_docs_examples_decode_and_book_checksum_verifies():
    docs = (REPO / "docs" / "events.md").read_text()
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", docs, re.S)]
    envelopes = [b for b in blocks if isinstance(b, dict) and "event" in b and "v" in b]
    seen = {decode_envelope_json(json.dumps(b).encode())[0].type for b in envelopes}
    assert seen >= set(EVENT_TYPES) - {"MarketDataL2EventTicks"}
    book = next(b["event"] for b in envelopes if b["type"] == "MarketDataL2Event")
    def strip(s):
        return s.replace(".", "").lstrip("0")
    text = "".join(strip(p) + strip(q) for p, q in book["asks"][:10]) + "".join(
        strip(p) + strip(q) for p, q in book["bids"][:10])
    assert zlib.crc32(text.encode()) == book["checksum"]
