"""An experiment, not a product: bookd publishing its book events itself (no bus hop).

    .venv/bin/python bench/bookd_direct.py --config FILE --pub ENDPOINT

Runs the real bookd (`bookd.service.run`) with one change: `book.*` events are stamped
in bookd (`bus.service.BusCore`: per-topic `seq`, this process's epoch, `pub_ns`) and
sent on a PUB socket bound at ENDPOINT, exactly as the bus would publish them; every
other event (system, triggers, stats) still goes to the bus. Flushing keeps bookd's
policy (`_Out`: the first batches of a drain pass are small, then up to 64 events) and
the bus's (stamp a batch, then send it back to back). The PUB lives in a context of its
own, closed after bookd's loop has ended (bookd terminates its own context on the way
out, which would wait forever for a socket it does not know).

`bench/loadtest.py --direct-books` runs it in place of `python -m bookd` and connects
the subscriber to ENDPOINT as well as to the bus, to measure what the design step
"bookd publishes book events itself" buys on this machine (README, "Where the time
goes": latency, not throughput). It has no cache and no msgpack.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zmq  # noqa: E402

import bookd.service as service  # noqa: E402
from bus.service import BusCore  # noqa: E402
from ingest.config import exit_on_config_error  # noqa: E402


def direct_out(endpoint: str, sndhwm: int, made: list | None = None) -> type:
    """`bookd.service._Out` with book events stamped here and published on `endpoint`;
    each instance is appended to `made` (to be closed)."""

    class DirectOut(service._Out):
        def __init__(self, to_bus: zmq.Socket, to_ingest: zmq.Socket, *args, **kw) -> None:
            super().__init__(to_bus, to_ingest, *args, **kw)
            self.core = BusCore(epoch=time.time_ns())
            self.ctx = zmq.Context()
            self.pub = self.ctx.socket(zmq.PUB)
            self.pub.setsockopt(zmq.SNDHWM, sndhwm)
            self.pub.setsockopt(zmq.LINGER, 0)
            self.pub.bind(endpoint)
            self.send = super(zmq.Socket, self.pub).send  # as the bus sends
            self.pending: list[tuple[bytes, bytes, bytes]] = []
            self.limit = self.first
            self.topics: dict[str, bytes] = {}
            self.types: dict[str, bytes] = {}
            if made is not None:
                made.append(self)

        def close(self) -> None:
            self.pub.close()
            self.ctx.term()

        def begin_pass(self) -> None:
            super().begin_pass()
            self.limit = self.first

        def event(self, topic: str, type_name: str, payload: bytes) -> None:
            if not topic.startswith("book."):
                # as _Out.event, but a full bus batch flushes only itself: pending book
                # events keep their own batch size
                if self.batch.add(topic, type_name, payload):
                    service._Out.flush(self)
                return
            t = self.topics.get(topic)
            if t is None:
                t = self.topics[topic] = topic.encode()
                self.types[topic] = type_name.encode()
            self.pending.append((t, self.types[topic], payload))
            if len(self.pending) >= self.limit:
                self.flush_books()

        def flush_books(self) -> None:
            pending, self.pending = self.pending, []
            self.limit = min(2 * self.limit, self.max_batch)
            stamp, clock, send = self.core.stamp, time.time_ns, self.send
            # Stamp the batch, then send it back to back, as the bus does. A PUB drops
            # silently for a full subscriber queue: the subscriber sees the seq jump.
            for m in [stamp(t, ty, p, clock()) for t, ty, p in pending]:
                send(m)

        def flush(self) -> None:
            if self.pending:
                self.flush_books()
            super().flush()

    return DirectOut


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--pub", required=True, help="endpoint the book PUB binds")
    args = ap.parse_args(argv)
    cfg = exit_on_config_error(args.config, "bookd")
    logging.basicConfig(level=cfg.system.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    made: list = []
    service._Out = direct_out(args.pub, cfg.bus.sndhwm, made)
    try:
        return service.run(cfg)
    finally:
        for out in made:
            out.close()


if __name__ == "__main__":
    sys.exit(main())
