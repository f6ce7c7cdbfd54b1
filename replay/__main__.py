"""`python -m replay`: the Kraken v2 replay server (see replay/server.py).

Prints one line `replay: listening on ws://HOST:PORT/v2 (control tcp://...)` to stderr
when it accepts connections. SIGTERM or SIGINT closes every connection and exits 0.
Exit 2 with one line for a bad flag, recording or source; 78 for a bad config.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import NoReturn

from ingest.config import exit_on_config_error

from .faults import FaultError, fault_help, parse_fault
from .recording import RecordingError
from .server import ReplayServer, parse_speed
from .source import BOOK_DEPTHS, Source, SourceError

PROG = "replay"
log = logging.getLogger("replay")

EPILOG = f"""\
faults (--fault SPEC, repeatable; also the control command `fault SPEC`):
{fault_help()}

control socket commands (ZMQ REQ/REP, one line each): fault SPEC | clear | status |
synthetic-rate R | help. Python: replay.control.ReplayControl(endpoint).fault("drop").

--port 0 / --control-port 0 bind free ports (the ready line shows them); without the
flags the [replay] config values apply (0 there = derived from the namespace).
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"python -m {PROG}",
                description="A Kraken Spot WebSocket v2 server replaying a recording or a "
                            "synthetic market, with fault injection.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="config file (default $KRAKENFEED_CONFIG or "
                                    "etc/krakenfeed.toml)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", metavar="RECORDING", nargs="+",
                     help="a recording (.ndjson or .ndjson.gz; ours or a DepthCharge "
                          "capture), or the rotated parts of one recording in order "
                          "(rec.0001.ndjson.gz rec.0002.ndjson.gz ...), served as one")
    src.add_argument("--synthetic", action="store_true",
                     help="serve the synthetic market (replay.synthetic) for [trading] pairs")
    p.add_argument("--host", help="listen address (default [replay] host)")
    p.add_argument("--port", type=int, help="listen port; 0 = a free port")
    p.add_argument("--control-port", type=int, help="control socket port; 0 = a free port")
    p.add_argument("--speed", default="1", metavar="1|N|max",
                   help="1 = real time, N = N times faster, max = as fast as possible")
    p.add_argument("--loop", action="store_true",
                   help="start again with fresh snapshots at the end (default: stop data, "
                        "keep heartbeats)")
    p.add_argument("--price-precision", type=int, metavar="P",
                   help="price decimals for every symbol (with --qty-precision)")
    p.add_argument("--qty-precision", type=int, metavar="Q",
                   help="qty decimals for every symbol (with --price-precision)")
    p.add_argument("--depth", type=int, choices=BOOK_DEPTHS,
                   help="book depth, for recordings without one and the synthetic market")
    p.add_argument("--fault", action="extend", nargs="+", default=[], metavar="SPEC",
                   help="arm faults at start (see below); repeatable")
    return p


def _open_source(args: argparse.Namespace, cfg) -> Source:  # noqa: ANN001 - Config
    if args.file:
        from .source import RecordingSource
        # one file or the rotated parts of one recording (read_recordings reads both)
        return RecordingSource.from_path(args.file, price_precision=args.price_precision,
                                         qty_precision=args.qty_precision, depth=args.depth)
    try:
        from . import synthetic
    except ImportError as e:
        raise SourceError(f"--synthetic needs replay.synthetic, which cannot be imported: {e}"
                          ) from None
    precisions = None
    if args.price_precision is not None:
        precisions = {s: (args.price_precision, args.qty_precision) for s in cfg.trading.pairs}
    depth = args.depth or cfg.data_ingestor.book_depth
    cls = getattr(synthetic, "SyntheticSource", None)
    if cls is None:
        raise SourceError("--synthetic needs replay.synthetic.SyntheticSource, which it does "
                          "not provide")
    try:
        return cls(tuple(cfg.trading.pairs), depth=depth, precisions=precisions)
    except ValueError as e:
        raise SourceError(f"--synthetic: {e}") from None


async def _serve(server: ReplayServer) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except OSError as e:
        log.error("cannot listen: %s", e)
        raise SystemExit(2) from None
    control = f" (control {server.control_endpoint})" if server.control_endpoint else ""
    log.info("listening on %s%s", server.url, control)
    await stop.wait()
    log.info("stopping: closing %d connection(s)", server.connections)
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("picows").setLevel(logging.WARNING)
    cfg = exit_on_config_error(args.config, PROG)
    logging.getLogger().setLevel(cfg.system.log_level.upper())

    def fail(msg: str) -> NoReturn:
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        raise SystemExit(2)

    if (args.price_precision is None) != (args.qty_precision is None):
        fail("pass both --price-precision and --qty-precision, or neither")
    for name in ("price_precision", "qty_precision"):
        v = getattr(args, name)
        if v is not None and not 0 <= v <= 18:
            fail(f"--{name.replace('_', '-')} must be between 0 and 18")
    for name in ("port", "control_port"):
        v = getattr(args, name)
        if v is not None and not 0 <= v <= 65535:
            fail(f"--{name.replace('_', '-')} must be between 0 and 65535")
    try:
        parse_speed(args.speed)
    except ValueError as e:
        fail(f"--speed: {e}")
    try:
        for spec in args.fault:
            parse_fault(spec)
    except FaultError as e:
        fail(f"--fault: {e}")
    try:
        source = _open_source(args, cfg)
    except (RecordingError, SourceError) as e:
        fail(str(e))
    port = args.port if args.port is not None else cfg.port("replay", "port")
    cport = (args.control_port if args.control_port is not None
             else cfg.port("replay", "control_port"))
    server = ReplayServer(source, cfg=cfg, host=args.host, port=port, control_port=cport,
                          speed=args.speed, loop=args.loop, faults=args.fault)
    import uvloop
    uvloop.run(_serve(server))
    return 0


if __name__ == "__main__":
    sys.exit(main())
