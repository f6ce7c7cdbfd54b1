"""The bookd process: the thin shell around BookKeeper.

Sockets (all under the run directory and the namespace, DESIGN.md section 3):

    <ns>.bookd      PULL, bound here     book frames + PairInfo/Stale/ConnectionState
                                         from ingest (ingest connects its PUSH)
    <ns>.ingest.ctl PUSH, connected      ResyncRequests to ingest (ingest binds)
    <ns>.bus.in     PUSH, connected      events to the bus (the bus binds)

ZMQ's connect-before-bind lets any process start first. Sends never block: a full
queue drops the message and counts it (`drops_bus`, `drops_ingest`).

Life cycle: create the shared-memory books (reclaiming a crashed bookd's segments,
refusing to start beside a live one), ask ingest for fresh snapshots of every pair,
then loop: drain the PULL socket, refresh the writer heartbeat every
`[bookd] heartbeat_ms`, run the keeper's periodic checks, publish a StatsEvent every
`[bookd] stats_interval_s`. SIGTERM/SIGINT: write the final state into every segment
(`halted` if `run/halt.json` exists, else `stale`), unlink, exit 0.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import msgspec
import zmq

from bookd.keeper import BookKeeper
from bookd.layout import BookState
from bookd.shm import BookWriter
from bus.schema import StatsEvent, ns_to_rfc3339
from ingest.config import Config
from ingest.messages import (
    BAD,
    CONTROL,
    FRAME,
    EventBatch,
    MessageError,
    ResyncRequest,
    batch_hwm,
    decode_control_payload,
    pack_control,
    unpack_inner,
)

log = logging.getLogger("bookd")
_json = msgspec.json.Encoder()
DRAIN = 2000
EVENT_BATCH = 64  # events per message to the bus at most
FIRST_FLUSH = 2  # events in the first batch of a drain pass (see _Out)


class _Out:
    """The keeper's sinks: events to the bus (batched), resyncs to ingest.

    Flush policy. Events are batched (one ZMQ message to the bus costs a few us on each
    side) and a batch goes out when it is full and at the end of each drain pass. Within
    a pass (`begin_pass` marks its start) "full" starts small and doubles with every
    batch sent: 2, 4, 8, ... up to `batch` events. The first events of a burst thus
    leave after one or two events' processing (~15 us each) instead of waiting for the
    whole burst (ingest forwards a replay tick of ~10 frames as one message: ~150 us),
    while a long pass under load adds only ~log2(batch) small sends before its batches
    are full-size. A count, not a clock: deciding costs nothing per event (a clock
    read and a comparison per event cost ~0.2 us). `first=batch` turns it off.
    """

    def __init__(self, to_bus: zmq.Socket, to_ingest: zmq.Socket,
                 batch: int = EVENT_BATCH, first: int = FIRST_FLUSH) -> None:
        self.to_bus = to_bus
        self.to_ingest = to_ingest
        self.batch = EventBatch(batch)
        self.drops_bus = 0
        self.drops_ingest = 0
        self.max_batch = batch
        self.first = min(first, batch)

    def begin_pass(self) -> None:
        """A drain pass starts (after a poll wake-up): batches start small again."""
        self.batch.limit = self.first

    def event(self, topic: str, type_name: str, payload: bytes) -> None:
        if self.batch.add(topic, type_name, payload):
            self.flush()

    def flush(self) -> None:
        batch = self.batch
        n = batch.count
        msg = batch.take()
        batch.limit = min(2 * batch.limit, self.max_batch)
        if msg is not None:
            try:
                self.to_bus.send(msg, zmq.NOBLOCK)
            except zmq.Again:
                self.drops_bus += n

    def resync(self, req: ResyncRequest) -> None:
        try:
            self.to_ingest.send(pack_control(req), zmq.NOBLOCK)
        except zmq.Again:
            self.drops_ingest += 1


def halt_file(cfg: Config) -> Path:
    return cfg.run_path / "halt.json"


def run(cfg: Config) -> int:
    cfg.run_path.mkdir(parents=True, exist_ok=True)
    pairs = list(cfg.trading.pairs)
    depth = cfg.data_ingestor.book_depth
    writer = BookWriter(cfg.namespace, pairs, depth, heartbeat_ms=cfg.bookd.heartbeat_ms)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, batch_hwm(cfg.ingest.send_hwm))  # ingest sends batches
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(cfg.ipc("bookd"))
    to_ingest = ctx.socket(zmq.PUSH)
    to_ingest.setsockopt(zmq.SNDHWM, 1000)
    to_ingest.setsockopt(zmq.LINGER, 0)
    to_ingest.connect(cfg.ipc("ingest.ctl"))
    to_bus = ctx.socket(zmq.PUSH)
    to_bus.setsockopt(zmq.SNDHWM, batch_hwm(cfg.bus.sndhwm, EVENT_BATCH))
    to_bus.setsockopt(zmq.LINGER, 500)
    to_bus.connect(cfg.ipc("bus.in"))
    out = _Out(to_bus, to_ingest)
    mono = time.monotonic_ns
    keeper = BookKeeper(
        pairs, depth, writer, out, clock_ns=time.time_ns,
        max_mismatches=cfg.data_ingestor.max_checksum_mismatches_before_resub,
        max_resyncs=cfg.bookd.max_resyncs_before_halt,
        resync_window_ns=int(cfg.bookd.resync_window_s * 1e9),
        stale_ns=int(cfg.bookd.stale_after_s * 1e9),
        resync_retry_ns=int(cfg.ingest.snapshot_timeout_s * 1e9))
    stop = []

    def _stop(signum, _frame):
        stop.append(signum)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("bookd: %d pairs at depth %d in namespace %s, listening on %s",
             len(pairs), depth, cfg.namespace, cfg.ipc("bookd"))
    keeper.request_all("bookd started", mono())
    hb_ns = cfg.bookd.heartbeat_ms * 1_000_000
    stats_ns = int(cfg.bookd.stats_interval_s * 1e9)
    next_hb = next_tick = 0
    next_stats = mono() + stats_ns
    bad = 0
    last_recv_ns = 0
    recv = pull.recv
    on_frame = keeper.on_frame

    try:
        while not stop:
            if pull.poll(cfg.bookd.heartbeat_ms):
                now = mono()
                out.begin_pass()
                for k in range(DRAIN):
                    if k & 63 == 63:  # a long pass must not starve the writer heartbeat
                        now = mono()
                        if now >= next_hb:
                            writer.heartbeat(now)
                            next_hb = now + hb_ns
                    try:
                        msg = recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        inner = unpack_inner(msg)  # header fields + payload of each
                    except MessageError as e:
                        bad += 1
                        log.warning("bad internal batch dropped: %s", e)
                        continue
                    for kind, pair_index, conn_id, seq, recv_ns, payload in inner:
                        if kind == FRAME:
                            on_frame(pair_index, conn_id, seq, recv_ns, payload, now)
                            last_recv_ns = recv_ns or last_recv_ns
                        elif kind == CONTROL:
                            try:
                                keeper.on_control(decode_control_payload(payload), now)
                            except MessageError as e:
                                bad += 1
                                log.warning("bad internal message dropped: %s", e)
                        else:  # BAD (a header unpack_inner refused), EVENT or BATCH
                            bad += 1
                            if kind == BAD:
                                log.warning("bad internal message dropped: %s", payload)
                out.flush()
            now = mono()
            if now >= next_hb:
                writer.heartbeat(now)
                next_hb = now + hb_ns
            if now >= next_tick:
                keeper.on_tick(now)
                next_tick = now + 1_000_000_000
            if now >= next_stats:
                next_stats = now + stats_ns
                counters = dict(keeper.counters, bad_messages=bad, drops_bus=out.drops_bus,
                                drops_ingest=out.drops_ingest)
                lag = (time.time_ns() - last_recv_ns) / 1e6 if last_recv_ns else 0.0
                ev = StatsEvent(timestamp=ns_to_rfc3339(time.time_ns()), process="bookd",
                                pid=os.getpid(), counters=counters,
                                gauges={"last_frame_age_ms": lag, **keeper.publish_lag()})
                out.event("stats", "StatsEvent", _json.encode(ev))
            out.flush()
    finally:
        out.flush()
        final = BookState.HALTED if halt_file(cfg).exists() else BookState.STALE
        log.info("bookd: stopping, books marked %s", final.name.lower())
        writer.close(final)
        for s in (pull, to_ingest, to_bus):
            s.close()
        ctx.term()
    return 0
