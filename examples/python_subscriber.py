"""Subscribe to one pair's books on the krakenfeed bus and print best bid and ask.

    python examples/python_subscriber.py [--config FILE] [--endpoint E] [--pair BTC/USD]
                                         [--count 10] [--late-join [--cache-endpoint E]]

Only pyzmq and the standard library speak to the bus here (the config is read only to
find the default endpoints), so the same steps work in any language:

* Live stream: a SUB socket on the JSON PUB (`tcp://127.0.0.1:<[bus] json_port>`),
  subscribed to `book.<PAIR> ` with the trailing space (exactly that pair, never
  BTC/USDT). Each message is one frame: topic, space, JSON envelope.
* Loss detection: per topic, `(epoch, seq)`; same epoch and a `seq` jump = messages
  lost (a slow subscriber's drops show up only this way); a new epoch = the bus
  restarted and `seq` starts again at 1.
* `--late-join`: the current book at once from the last-value cache, then the live
  stream without gap or duplicate (docs/events.md, "Late join"):
  1. subscribe first, and give the subscription a moment to take effect (ZMQ
     subscribes asynchronously; a first live message proves it);
  2. ask the cache: a REQ socket on `tcp://127.0.0.1:<[bus] cache_port>`, one frame
     holding a topic prefix; the reply is one frame `{"epoch": E, "messages":
     [<envelope>, ...]}` with the latest envelope of every topic under the prefix;
  3. print the cached book, then drop live messages whose `seq` is <= the cached one
     in the same epoch. A live message of another epoch is newer than the cache (the
     bus restarted in between): take it and count from it.

Lines look like `BTC/USD  bid 45283.5 x 0.10000000  ask 45285.2 x 0.00100000  seq 12`
(`(cache)` at the end for the cached one). Prices and quantities are printed as the
decimal strings they are: never turn them into floats.

Exit status: 0 after --count lines, 1 if nothing arrives within --timeout seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import zmq

SUBSCRIBE_GRACE_S = 0.25  # longest wait for the subscription before asking the cache


def default_endpoints(config: str | None) -> tuple[str, str]:
    """JSON PUB and cache endpoints from the krakenfeed config (ports derived there)."""
    try:
        import ingest  # noqa: F401
    except ImportError:  # run from a checkout without installing the package
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ingest.config import exit_on_config_error

    cfg = exit_on_config_error(config, "python_subscriber")
    host = "127.0.0.1" if cfg.bus.bind_host in ("0.0.0.0", "*") else cfg.bus.bind_host
    return (f"tcp://{host}:{cfg.port('bus', 'json_port')}",
            f"tcp://{host}:{cfg.port('bus', 'cache_port')}")


def line(env: dict, note: str = "") -> str:
    ev = env["event"]

    def best(side: list) -> str:
        return f"{side[0][0]} x {side[0][1]}" if side else "- x -"

    return (f"{ev['pair']}  bid {best(ev['bids'])}  ask {best(ev['asks'])}  seq {env['seq']}"
            + (f"  {note}" if note else ""))


def ask_cache(ctx: zmq.Context, endpoint: str, topic: str, timeout: float) -> dict | None:
    """The cache's reply for `topic` as a prefix, or None when no bus answers."""
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(endpoint)
    try:
        req.send(topic.encode())
        if not req.poll(int(timeout * 1000)):
            return None
        return json.loads(req.recv())
    finally:
        req.close()


def run(endpoint: str, cache_endpoint: str | None, pair: str, count: int,
        timeout: float) -> int:
    topic = f"book.{pair}"
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, f"{topic} ".encode())  # trailing space: this pair only
    sub.connect(endpoint)
    last: tuple[int, int] | None = None  # (epoch, seq) of the last message printed
    printed = 0
    try:
        if cache_endpoint:
            sub.poll(int(SUBSCRIBE_GRACE_S * 1000))  # 1. the subscription is in effect
            reply = ask_cache(ctx, cache_endpoint, topic, timeout)  # 2. ask the cache
            if reply is None:
                print(f"python_subscriber: no cache answered at {cache_endpoint}",
                      file=sys.stderr)
                return 1
            # The prefix "book.BTC/USD" also matches book.BTC/USDT: keep the exact topic.
            for env in reply["messages"]:
                if env["topic"] == topic:
                    print(line(env, "(cache)"), flush=True)
                    last = (env["epoch"], env["seq"])
                    printed += 1
        deadline = time.monotonic() + timeout
        while not count or printed < count:
            wait_ms = int((deadline - time.monotonic()) * 1000) if not printed else 1000
            if not sub.poll(max(0, wait_ms)):
                if not printed and time.monotonic() >= deadline:
                    print(f"python_subscriber: nothing on {topic} from {endpoint} within "
                          f"{timeout:g} s", file=sys.stderr)
                    return 1
                continue
            frame = sub.recv()
            env = json.loads(frame[frame.index(b" ") + 1:])  # Python ints are exact
            if last is not None and env["epoch"] == last[0]:
                if env["seq"] <= last[1]:
                    continue  # 3. already known from the cache
                if env["seq"] != last[1] + 1:
                    print(f"python_subscriber: lost {env['seq'] - last[1] - 1} message(s)",
                          file=sys.stderr)
            elif last is not None:
                print("python_subscriber: the bus restarted (new epoch)", file=sys.stderr)
            last = (env["epoch"], env["seq"])
            print(line(env), flush=True)
            printed += 1
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        sub.close()
        ctx.term()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="krakenfeed config, for the default endpoints")
    ap.add_argument("--endpoint", help="JSON PUB (default tcp://127.0.0.1:<[bus] json_port>)")
    ap.add_argument("--cache-endpoint",
                    help="last-value cache (default tcp://127.0.0.1:<[bus] cache_port>)")
    ap.add_argument("--pair", default="BTC/USD")
    ap.add_argument("--count", type=int, default=10, help="lines to print (0 = forever)")
    ap.add_argument("--late-join", action="store_true",
                    help="start with the cached book, then the live stream")
    ap.add_argument("--timeout", type=float, default=10.0)
    args = ap.parse_args(argv)
    endpoint, cache_endpoint = args.endpoint, args.cache_endpoint
    if not endpoint or (args.late_join and not cache_endpoint):
        default_json, default_cache = default_endpoints(args.config)
        endpoint = endpoint or default_json
        cache_endpoint = cache_endpoint or default_cache
    return run(endpoint, cache_endpoint if args.late_join else None, args.pair, args.count,
               args.timeout)


if __name__ == "__main__":
    sys.exit(main())
