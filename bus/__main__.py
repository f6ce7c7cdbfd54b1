"""`python -m bus [--config FILE]`: the public event bus (see bus/service.py)."""

from __future__ import annotations

import argparse
import logging
import sys

from ingest.config import exit_on_config_error


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bus",
        description="Publish krakenfeed events to any subscriber: one ZMQ PUB of JSON "
                    "envelopes (topic, space, JSON) and one of msgpack, both on "
                    "127.0.0.1 and ipc:// under the run directory, plus a last-value "
                    "cache for late joiners. Ports come from [bus] in the config.")
    ap.add_argument("--config", help="config file (default: etc/krakenfeed.toml or "
                                     "$KRAKENFEED_CONFIG)")
    args = ap.parse_args(argv)
    cfg = exit_on_config_error(args.config, "bus")
    logging.basicConfig(level=cfg.system.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import zmq

    from bus.service import run

    try:
        return run(cfg)
    except zmq.ZMQError as e:
        logging.getLogger("bus").error("cannot bind the bus sockets: %s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
