"""Baseline (b): python-kraken-sdk 3.5.1's `SpotOrderBookClient` on the replay server.

Pointing it at the replay server takes two local changes, both in this file and only in
this process (the installed package is not modified):

* **URL.** 3.5.1's constructor takes no URL: `SpotWSClientBase.__init__` keeps the
  class attribute `WS_URL` (`"wss://ws.kraken.com"`) and appends `API_V` (`"/v2"`). A
  subclass made here sets `WS_URL = "ws://127.0.0.1:PORT"` (the replay URL without
  `/v2`), so the client connects to `ws://127.0.0.1:PORT/v2`.
* **Pair decimals.** On the first book message of a pair the client asks Kraken's REST
  API for the pair's decimals (`Market.get_asset_pairs(pair=...)`, using
  `pair_decimals` for prices and `lot_decimals` for quantities in its checksum). We
  replace `kraken.spot.Market.get_asset_pairs` with a function that answers from the
  recording's header: `{pair: {"pair_decimals": price_precision, "lot_decimals":
  qty_precision, ...}}`. No request leaves the machine.

Everything else is the SDK's own code path: its websockets connection (`max_queue=None`,
`json.loads` per frame, `asyncio.wait_for(recv(), 10)` per message), `on_message`
(float formatting of every level, a full sort and `OrderedDict` rebuild of the side
after every level, checksum by string concatenation on every update), and
`on_book_update`, which we override to count messages and the SDK's own checksum
verdicts (on a mismatch it calls `on_book_update` with an `"error"` message, then
resubscribes).

    python bench/baseline_pks.py --url ws://127.0.0.1:PORT/v2 --file RECORDING
        [--expect N] [--max-seconds S] [--idle-seconds 1.0]

Prints one JSON object like bench/baseline_seed.py: book messages, seconds,
msgs_per_s, checked (updates whose checksum the SDK validated), mismatches.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline_seed import read_header  # noqa: E402


def patch_asset_pairs(prec: dict[str, tuple[int, int]]) -> None:
    """Answer `Market.get_asset_pairs` from our precisions (no REST call)."""
    from kraken.spot import Market

    def get_asset_pairs(self, pair=None, info=None, aclass_base=None, *,  # noqa: ANN001, ANN202
                        extra_params=None):
        names = [pair] if isinstance(pair, str) else list(pair or prec)
        out = {}
        for name in names:
            pp, qp = prec[name]
            base, _, quote = name.partition("/")
            out[name] = {"altname": base + quote, "wsname": name, "pair_decimals": pp,
                         "lot_decimals": qp, "cost_decimals": pp, "status": "online"}
        return out

    Market.get_asset_pairs = get_asset_pairs


def make_client_class(ws_base: str | None = None):  # noqa: ANN201
    """A SpotOrderBookClient subclass that counts what `on_book_update` receives."""
    from kraken.spot import SpotOrderBookClient

    attrs = {}
    if ws_base is not None:
        attrs["WS_URL"] = ws_base

    async def on_book_update(self, pair: str, message: dict) -> None:  # noqa: ANN001
        if "error" in message:
            self.bench_mismatches += 1
            return
        now = time.perf_counter()
        cpu = time.process_time()
        if not self.bench_messages:
            self.bench_first, self.bench_cpu_first = now, cpu
        self.bench_last, self.bench_cpu_last = now, cpu
        self.bench_messages += 1
        if message.get("type") != "snapshot":
            self.bench_checked += 1

    def __init__(self, depth: int = 10) -> None:  # noqa: ANN001
        SpotOrderBookClient.__init__(self, depth=depth)
        self.bench_messages = 0
        self.bench_checked = 0
        self.bench_mismatches = 0
        self.bench_first = self.bench_last = 0.0
        self.bench_cpu_first = self.bench_cpu_last = 0.0

    attrs.update(on_book_update=on_book_update, __init__=__init__)
    return type("BenchOrderBook", (SpotOrderBookClient,), attrs)


async def run(args: argparse.Namespace) -> dict:
    symbols, depth, prec = read_header(args.file)
    patch_asset_pairs(prec)
    base = args.url[:-3] if args.url.endswith("/v2") else args.url
    client = make_client_class(base)(depth=depth)
    await client.start()
    await client.add_book(pairs=symbols)
    t_sub = time.perf_counter()
    seen, quiet_since = -1, t_sub
    while True:
        await asyncio.sleep(0.1)
        now = time.perf_counter()
        n = client.bench_messages
        if n != seen:
            seen, quiet_since = n, now
        if args.expect and n >= args.expect:
            break
        if n and (now - quiet_since > args.idle_seconds or now - client.bench_first
                  > args.max_seconds):
            break
        if not n and now - t_sub > 30:
            break
        if client.exception_occur:
            break
    await client.close()
    n = client.bench_messages
    dt = max(client.bench_last - client.bench_first, 1e-9)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"baseline": "python-kraken-sdk", "messages": n, "seconds": dt,
            "msgs_per_s": (n - 1) / dt if n > 1 else 0.0, "checked": client.bench_checked,
            "mismatches": client.bench_mismatches, "url": client.WS_URL,
            "cpu_s": ru.ru_utime + ru.ru_stime,
            "cpu_us_per_msg": (client.bench_cpu_last - client.bench_cpu_first) * 1e6 / max(1, n - 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--file", required=True, help="the recording the server plays")
    ap.add_argument("--expect", type=int, default=0, help="stop after N book frames")
    ap.add_argument("--max-seconds", type=float, default=30.0)
    ap.add_argument("--idle-seconds", type=float, default=1.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(asyncio.run(run(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
