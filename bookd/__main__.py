"""`python -m bookd [--config FILE]`: the book keeper process (see bookd/service.py)."""

from __future__ import annotations

import argparse
import logging
import sys

from ingest.config import exit_on_config_error


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bookd",
        description="Keep checksum-validated Kraken L2 books in shared memory. Takes book "
                    "frames from ingest, checks the CRC32 of every message, publishes "
                    "valid books to shared memory and MarketDataL2Events to the bus, and "
                    "asks ingest for a fresh snapshot of any pair that goes wrong.")
    ap.add_argument("--config", help="config file (default: etc/krakenfeed.toml or "
                                     "$KRAKENFEED_CONFIG)")
    args = ap.parse_args(argv)
    cfg = exit_on_config_error(args.config, "bookd")
    logging.basicConfig(level=cfg.system.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from bookd.service import run
    from bookd.shm import ShmError

    try:
        return run(cfg)
    except ShmError as e:
        logging.getLogger("bookd").error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
