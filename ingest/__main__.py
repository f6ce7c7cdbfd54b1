"""`python -m ingest [--config FILE] [--check-config] [--url URL] [--record PATH ...]`.

The ingest process. `--record PATH` also writes every frame received and sent to a
recording (ingest/record.py; rotation with `--record-max-bytes` / `--record-rotate-s`,
queue size `--record-queue`); without it nothing is recorded.

`--check-config` loads and validates the config, prints the resolved values and exits 0
(or exits 78 with one line naming the bad key). Otherwise the process itself runs from
`ingest.app.main(cfg, args)`, imported only then.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ingest.config import dump_config, exit_on_config_error
from ingest.record import DEFAULT_QUEUE, add_record_options


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ingest",
        description="Connect to Kraken Spot WebSocket v2, subscribe to the configured "
                    "pairs and forward their book frames and events to bookd and the bus.")
    ap.add_argument("--config", help="config file (default: etc/krakenfeed.toml or "
                                     "$KRAKENFEED_CONFIG)")
    ap.add_argument("--check-config", action="store_true",
                    help="validate the config, print the resolved values and exit")
    ap.add_argument("--url", help="WebSocket URL overriding data_ingestor.kraken_ws_url, "
                                  "e.g. ws://127.0.0.1:PORT/v2; 'replay' means the bundled "
                                  "replay server at [replay] host and port")
    ap.add_argument("--ca-file", help="extra CA certificate (PEM) to trust for wss:// "
                                      "(tests with a private CA; Kraken needs none)")
    ap.add_argument("--record", metavar="PATH",
                    help="also record every frame received (and sent) to PATH (.ndjson, "
                         ".ndjson.gz for gzip) from a background thread; see "
                         "`python -m ingest.record` for a standalone recorder")
    add_record_options(ap)
    args = ap.parse_args(argv)
    if not args.record and (args.record_max_bytes or args.record_rotate_s
                            or args.record_queue != DEFAULT_QUEUE):
        ap.error("--record-max-bytes, --record-rotate-s and --record-queue need --record PATH")
    cfg = exit_on_config_error(args.config, "ingest")
    if args.check_config:
        print(dump_config(cfg))
        return 0
    try:
        app = importlib.import_module("ingest.app")
    except ModuleNotFoundError as e:
        if e.name != "ingest.app":
            raise
        print("ingest: ingest app not available yet", file=sys.stderr)
        return 1
    return app.main(cfg, args)


if __name__ == "__main__":
    sys.exit(main())
