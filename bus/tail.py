"""`python -m bus.tail`: watch the bus as a person would.

Starts with the last-value cache (the current state of every matching topic), then
follows the live stream, stitched without gap or duplicate: live messages whose `seq`
is not newer than the cached one of their topic are dropped. Readable lines by
default; `--json` prints each envelope as one JSON line. Every printed message counts
toward `--count`, after which it exits 0. With no bus reachable it says so and exits 1
after `--timeout` seconds, never hangs.
"""

from __future__ import annotations

import argparse
import sys
import time

import msgspec
import zmq

from bus import schema
from ingest.config import exit_on_config_error

_dec = msgspec.json.Decoder()
SUBSCRIBE_GRACE_S = 0.25  # longest wait for the subscription before asking the cache


class _CacheReply(msgspec.Struct):
    epoch: int
    messages: list[msgspec.Raw]


_cache_dec = msgspec.json.Decoder(_CacheReply)


def _level(side: list) -> str:
    return f"{side[0][0]} x {side[0][1]}" if side else "-"


def describe(topic: str, env: dict) -> str:
    """One readable line for an envelope (as a plain dict)."""
    ev = env.get("event", {})
    kind = env.get("type", "?")
    if kind == "MarketDataL2Event":
        bids, asks = ev.get("bids", []), ev.get("asks", [])
        spread = ""
        if bids and asks:
            b, _ = schema.decimal_to_ticks(bids[0][0])
            a, pa = schema.decimal_to_ticks(asks[0][0])
            pb = len(bids[0][0].partition(".")[2])
            p = max(pa, pb)
            spread = "  spread " + schema.ticks_to_decimal(
                abs(a * 10 ** (p - pa) - b * 10 ** (p - pb)), p)
        return (f"{ev.get('pair')}  bid {_level(bids)}  ask {_level(asks)}{spread}"
                f"  ({len(bids)}x{len(asks)} levels, crc {ev.get('checksum')})")
    if kind == "MarketDataTradeEvent":
        return (f"{ev.get('pair')}  trade {ev.get('side')} {ev.get('qty')} @ {ev.get('price')}"
                f"  id {ev.get('trade_id')}")
    if kind == "MarketDataOHLCVEvent":
        return (f"{ev.get('pair')}  {ev.get('interval')} candle {ev.get('timestamp')}  "
                f"O {ev.get('open')} H {ev.get('high')} L {ev.get('low')} C {ev.get('close')}"
                f"  V {ev.get('volume')}{'  closed' if ev.get('closed') else ''}")
    if kind == "SystemStateEvent":
        pair = f" {ev['pair']}" if ev.get("pair") else ""
        return (f"system  {ev.get('service_name')}{pair}: {ev.get('status_code')} "
                f"{ev.get('status_message')}")
    if kind == "PotentialHaltTriggerEvent":
        return f"TRIGGER {ev.get('source_module')} {ev.get('error_code')}: {ev.get('reason')}"
    if kind == "HaltDecision":
        return f"HALT {ev.get('reason')} (stopped {', '.join(ev.get('stopped', []))})"
    if kind == "StatsEvent":
        c = ev.get("counters", {})
        shown = ", ".join(f"{k}={v}" for k, v in list(c.items())[:8])
        gauges = ", ".join(f"{k}={v:.6g}" for k, v in (ev.get("gauges") or {}).items()
                           if isinstance(v, (int, float)))
        return f"stats  {ev.get('process')}: {shown}" + (f"; {gauges}" if gauges else "")
    return f"{topic}  {kind}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bus.tail",
        description="Print krakenfeed bus events: the last-value cache first, then the live "
                    "stream. Defaults come from the config, so with no flags it finds the "
                    "system that `make run` started.")
    ap.add_argument("--config", help="config file (default: etc/krakenfeed.toml)")
    ap.add_argument("--topic", action="append", default=[],
                    help="topic prefix to follow, repeatable (e.g. book.BTC/USD, trade., "
                         "system); default: everything. A full topic matches exactly that "
                         "topic (BTC/USD never matches BTC/USDT).")
    ap.add_argument("--count", type=int, default=0,
                    help="exit 0 after printing this many messages (default: run until Ctrl-C)")
    ap.add_argument("--json", action="store_true", help="print each envelope as one JSON line")
    ap.add_argument("--endpoint", help="bus JSON PUB endpoint (default: tcp://127.0.0.1:<[bus] "
                                       "json_port>)")
    ap.add_argument("--cache-endpoint", help="last-value cache endpoint (default: from config)")
    ap.add_argument("--no-cache", action="store_true", help="skip the last-value cache")
    ap.add_argument("--timeout", type=float, default=10.0,
                    help="seconds to wait for the first message before giving up (exit 1)")
    args = ap.parse_args(argv)
    if args.count < 0 or args.timeout <= 0:
        ap.error("--count must be >= 0 and --timeout > 0")
    cfg = exit_on_config_error(args.config, "bus.tail")
    host = "127.0.0.1" if cfg.bus.bind_host in ("0.0.0.0", "*") else cfg.bus.bind_host
    endpoint = args.endpoint or f"tcp://{host}:{cfg.port('bus', 'json_port')}"
    cache_ep = args.cache_endpoint or f"tcp://{host}:{cfg.port('bus', 'cache_port')}"
    prefixes = [_prefix(t) for t in args.topic] or [b""]

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    for p in prefixes:
        sub.setsockopt(zmq.SUBSCRIBE, p)
    sub.connect(endpoint)
    printed = 0
    cached_seq: dict[str, tuple[int, int]] = {}
    out = sys.stdout

    def emit(topic: str, payload: bytes, env: dict) -> bool:
        nonlocal printed
        out.write((payload.decode() if args.json else describe(topic, env)) + "\n")
        out.flush()
        printed += 1
        return bool(args.count) and printed >= args.count

    try:
        deadline = time.monotonic() + args.timeout
        if not args.no_cache:
            # ZMQ subscribes asynchronously: asked before the subscription is in effect,
            # the cache would miss what the bus publishes in between (a seq gap). A first
            # live message proves it is; quiet topics get a short grace instead.
            sub.poll(int(min(SUBSCRIBE_GRACE_S, args.timeout / 4) * 1000))
            reply = _ask_cache(ctx, cache_ep, prefixes,
                               max(0.001, deadline - time.monotonic()))
            if reply is None:
                print(f"bus.tail: no bus answered at {cache_ep} within {args.timeout:g} s "
                      "(is the system running? `make status`)", file=sys.stderr)
                return 1
            for payload in reply:
                env = _dec.decode(payload)
                cached_seq[env["topic"]] = (env["epoch"], env["seq"])
                if emit(env["topic"], payload, env):
                    return 0
        while True:
            timeout_ms = max(0, int((deadline - time.monotonic()) * 1000)) if not printed else 1000
            if not sub.poll(timeout_ms):
                if not printed and time.monotonic() >= deadline:
                    print(f"bus.tail: no message from {endpoint} within {args.timeout:g} s "
                          "(is the system running? `make status`)", file=sys.stderr)
                    return 1
                continue
            topic, payload = schema.split_frame(sub.recv())
            env = _dec.decode(payload)
            seen = cached_seq.get(topic)
            if seen is not None:
                if seen[0] == env["epoch"] and env["seq"] <= seen[1]:
                    continue  # already printed from the cache
                del cached_seq[topic]
            if emit(topic, payload, env):
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        sub.close()
        ctx.term()


def _prefix(topic: str) -> bytes:
    """A full book/trade/ohlc topic gets its trailing space: exactly that pair."""
    try:
        kind, _, pair = schema.parse_topic(topic)
    except schema.SchemaError:
        return topic.encode()
    return schema.subscription_prefix(topic) if pair or kind in (
        "system", "trigger", "halt", "stats") else topic.encode()


def _ask_cache(ctx: zmq.Context, endpoint: str, prefixes: list[bytes],
               timeout: float) -> list[bytes] | None:
    """Envelopes from the last-value cache for every prefix, or None if no answer."""
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    for prefix in prefixes:
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(endpoint)
        try:
            req.send(prefix.rstrip(b" "))
            if not req.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                return None
            reply = _cache_dec.decode(req.recv())
        finally:
            req.close()
        for raw in reply.messages:
            payload = bytes(raw)
            env = _dec.decode(payload)
            if prefix.endswith(b" ") and env["topic"] != prefix[:-1].decode():
                continue
            out.append(payload)
    return out


if __name__ == "__main__":
    sys.exit(main())
