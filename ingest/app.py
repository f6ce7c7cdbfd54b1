"""The ingest process: the I/O shell that runs `KrakenSession` on uvloop and picows.

What it owns (DESIGN.md sections 1 and 3):

    WebSocket            picows client to Kraken or the replay server (`--url`)
    <ns>.bookd           PUSH, connected: book frames as received (header + bytes) and
                         PairInfo / Stale / ConnectionState, in order, on one socket
    <ns>.bus.in          PUSH, connected: trades, candles, system states, triggers, stats
    <ns>.ingest.ctl      PULL, bound: ResyncRequests from bookd

The hot path is `on_text`: peek the channel; a book frame is peeked for its symbol,
counted by the session (`on_book_frame`, liveness only) and forwarded with its
connection id, a per-(connection, pair) sequence number and the receive time. Sends
never block: a full queue drops the frame, counts it, and the pair's sequence number
still advances, so bookd sees the gap and resyncs that pair alone. Frames larger than
`[ingest] max_frame_bytes` are counted and dropped; the connection stays.

Everything else goes through the session, whose actions are executed in order here.
SIGTERM/SIGINT: the session closes the connection and tells bookd and the bus; the
process exits 0 within a second.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import ssl
import time

import msgspec
import zmq

from bus.schema import StatsEvent, ns_to_rfc3339, topic_for
from ingest import actions as act
from ingest.config import Config
from ingest.messages import (
    CONTROL,
    Batcher,
    ConnectionState,
    MessageError,
    ResyncRequest,
    batch_hwm,
    decode_control,
    pack_control,
    pack_event,
    pack_frame,
    unpack_header,
)
from ingest.protocol import KrakenSession
from ingest.record import Recorder, RecordError, recorder_from_args
from ingest.transport import ConnectError, FeedListener, open_connection
from ingest.wire import peek_symbol

log = logging.getLogger("ingest")
_json = msgspec.json.Encoder()
_BOOK_PREFIX = b'{"channel":"book"'  # the frame's channel is "book" (see wire.peek_channel)
_SNAPSHOT_PREFIX = b'{"channel":"book","type":"snapshot"'
_time_ns = time.time_ns
_mono_ns = time.monotonic_ns
# The first frame of a socket read that ends an idle gap goes to bookd at once (see
# IngestApp.__init__); "idle": no read ended for this long.
IDLE_GAP_NS = 250_000


def resolve_url(cfg: Config, url: str | None) -> str:
    """`--url replay` is the bundled replay server of this config; None is Kraken."""
    if url == "replay":
        return f"ws://{cfg.replay.host}:{cfg.port('replay', 'port')}/v2"
    return url or cfg.data_ingestor.kraken_ws_url


class IngestApp:
    def __init__(self, cfg: Config, url: str, *, ssl_context: ssl.SSLContext | None = None,
                 rng: random.Random | None = None, recorder: Recorder | None = None) -> None:
        self.cfg = cfg
        self.url = url
        self.recorder = recorder  # ingest/record.py: None unless --record
        self.ssl_context = ssl_context
        self.session = KrakenSession(cfg, rng or random.Random(), url)
        self._on_book_frame = self.session.on_book_frame  # bound once: the hot path
        self.pair_index = {p: i for i, p in enumerate(cfg.trading.pairs)}
        self.max_frame = cfg.ingest.max_frame_bytes
        self.ctx = zmq.Context()
        # Everything for bookd (frames and control, in order) is batched per socket read
        # and sent as one ZMQ message when picows says the read is done (flush_bookd),
        # or earlier: when full, and the first frame of a read after an idle gap
        # (see _flush_at below).
        # The queue bound is in frames: [ingest] send_hwm frames in full batches.
        self.bookd_batch = Batcher()
        self.to_bookd = self._socket(zmq.PUSH, cfg.ipc("bookd"), batch_hwm(cfg.ingest.send_hwm))
        # pyzmq's Python-level Socket.send wrapper costs ~0.3 us a call; its Cython base
        # is the same send.
        self._send_bookd = super(zmq.Socket, self.to_bookd).send
        # Latency at low load: when a socket read comes after an idle gap (the start of
        # a burst from the server, ~10 frames per 1 ms tick at 10 k msg/s), its first
        # frame goes to bookd at once and the rest as one batch when picows says the
        # read is over. bookd (~20 us a frame) starts on the burst while ingest (~4 us
        # a frame) still reads the rest, instead of after it. Other reads go as one
        # batch (or full ones): under load bookd is busy anyway, and full batches keep
        # the queue bound (it counts ZMQ messages) worth [ingest] send_hwm frames.
        # Measured at 10 k msg/s (pipeline, interleaved runs on a noisy host): p50 about
        # 20-80 us lower, ~2 us more CPU per message over all processes; a ladder of
        # 1, 2, 4, 8-frame early batches was no better and cost ~10 us per message.
        # `_flush_at`: the batch size that makes a send before the read ends, 1 for
        # the first frame of a read.
        self._flush_at = 1
        self._idle_since = 0  # monotonic ns of the last send at the end of a read
        self.to_bus = self._socket(zmq.PUSH, cfg.ipc("bus.in"), cfg.ingest.send_hwm)
        self.ctl = self.ctx.socket(zmq.PULL)
        self.ctl.setsockopt(zmq.LINGER, 0)
        self.ctl.bind(cfg.ipc("ingest.ctl"))
        # Connection ids are unique across ingest restarts: a random high half.
        self._conn_base = random.getrandbits(31) << 32
        self._conn_n = 0
        self.conn: FeedListener | None = None
        self.conn_id = 0
        # The connection being opened: picows hands over frames that arrive with the
        # handshake (Kraken's status frame) before open_connection returns; they are
        # kept here and replayed once the session knows the connection.
        self._opening = 0
        self._early: list[bytes] = []
        self._early_closed = False
        self.seq = [0] * len(cfg.trading.pairs)
        self.counters = dict.fromkeys((
            "ws_frames", "forwarded", "oversized", "binary", "unknown_pair", "not_subscribed",
            "drops_bookd", "drops_bus", "bad_control", "resync_requests"), 0)
        self._wake: asyncio.TimerHandle | None = None
        self._progress = (0.0, 0)  # (monotonic time, forwarded) at the last stats line
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    def _socket(self, kind: int, endpoint: str, hwm: int) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.SNDHWM, hwm)
        s.setsockopt(zmq.LINGER, 200)
        s.connect(endpoint)
        return s

    # -- the hot path ------------------------------------------------------------------
    def on_text(self, conn_id: int, payload: bytes, last: bool = True) -> None:
        """One text frame from picows; `last`: no other frame follows in this read.

        A book frame of the current connection goes straight to `forward` (the hot
        path: this used to be four nested calls, ~0.4 us per frame more); everything
        else goes through `_rx`, which hands it to the session.
        """
        if conn_id == self.conn_id:
            now = _time_ns()
            if self.recorder is not None:
                self.recorder.rx(payload, now)
            c = self.counters
            c["ws_frames"] += 1  # every text frame; the session counts its own "frames"
            # `peek_channel(payload) == "book"`, in one C call.
            if payload.startswith(_BOOK_PREFIX) and len(payload) <= self.max_frame:
                symbol = peek_symbol(payload)
                if symbol is not None and self._on_book_frame(
                        symbol, payload.startswith(_SNAPSHOT_PREFIX), now):
                    self.forward(payload, symbol, now)
                else:
                    c["not_subscribed"] += 1
            else:
                self._rx(payload, now)
        elif conn_id == self._opening:
            self._early.append(payload)  # replayed by _connect
        # else a frame of a connection the session already let go
        if last:
            self.flush_bookd()

    def _rx(self, payload: bytes, now: int) -> None:
        """A frame that is not a book frame within limits: oversized, or the session's."""
        if len(payload) > self.max_frame:
            self.on_oversized(self.conn_id, len(payload))
            return
        self.execute(self.session.on_frame(payload, now))

    def forward(self, payload: bytes, symbol: str, now: int) -> None:
        """A book frame of the current connection to bookd, with its header: from
        `on_text`, and for a frame the session handed back (`ForwardBook`)."""
        i = self.pair_index.get(symbol)
        if i is None:
            self.counters["unknown_pair"] += 1
            return
        seq = self.seq[i] = self.seq[i] + 1
        self.counters["forwarded"] += 1
        self._to_bookd(pack_frame(payload, self.conn_id, i, seq, now))

    def _to_bookd(self, msg: bytes) -> None:
        pending = self.bookd_batch.pending
        pending.append(msg)
        if len(pending) >= self._flush_at:
            self._flush_early()

    def _flush_early(self) -> None:
        """The batch reached `_flush_at` before the socket read ended: send it if it
        is full, or if it is the first frame of a read after an idle gap."""
        if self._flush_at == 1:  # the first frame of this read
            self._flush_at = self.bookd_batch.limit
            if _mono_ns() - self._idle_since < IDLE_GAP_NS:
                return  # busy: the whole read goes as one batch
        self._send_batch()

    def flush_bookd(self) -> None:
        """The socket read is over (or no read is going on): send what is batched."""
        self._flush_at = 1
        self._send_batch()
        self._idle_since = _mono_ns()

    def _send_batch(self) -> None:
        """Send what is batched for bookd; a full queue drops it all and counts it.

        Dropped frames keep their sequence numbers consumed, so bookd sees the gap.
        """
        pending = self.bookd_batch.pending
        if pending:
            n = len(pending)
            msg = self.bookd_batch.take()
            try:
                self._send_bookd(msg, zmq.NOBLOCK)
            except zmq.Again:
                self.counters["drops_bookd"] += n

    # -- other transport events --------------------------------------------------------
    def on_oversized(self, conn_id: int, size: int) -> None:
        self.counters["oversized"] += 1
        log.warning("dropped a %d-byte frame (over [ingest] max_frame_bytes = %d)",
                    size, self.max_frame)

    def on_binary(self, conn_id: int, what: str) -> None:
        self.counters["binary"] += 1
        log.warning("ignored a %s on connection %d", what, conn_id)

    def on_closed(self, conn_id: int) -> None:
        if conn_id == self._opening:
            self._early_closed = True
        elif conn_id == self.conn_id:
            self.conn = None
            self.execute(self.session.on_disconnected(time.time_ns(), "closed by peer",
                                                      conn_id))
            self.flush_bookd()

    # -- actions -----------------------------------------------------------------------
    def execute(self, actions: list) -> None:
        for a in actions:
            t = type(a)
            if t is act.Send:
                if self.conn is not None:
                    self.conn.send_text(a.text)
                    if self.recorder is not None:
                        self.recorder.tx(a.text, time.time_ns())
            elif t is act.Publish:
                ev = a.event
                self._to_bus(topic_for(ev), type(ev).__name__, _json.encode(ev))
            elif t is act.ToBookd:
                self._to_bookd_control(a.message, a.pair_index)
            elif t is act.ScheduleWake:
                self._schedule(a.at_ns)
            elif t is act.Log:
                log.log(a.level, "%s", a.message)
            elif t is act.Connect:
                self._spawn(self._connect(a))
            elif t is act.Close:
                conn, self.conn = self.conn, None
                self.conn_id = 0  # frames still queued from it are dropped
                if conn is not None:
                    conn.close()
            elif t is act.ForwardBook:
                self.forward(a.frame, a.symbol, time.time_ns())
            else:  # a new action type the shell does not know is a programming error
                raise TypeError(f"unknown action {a!r}")

    def _to_bus(self, topic: str, type_name: str, body: bytes) -> None:
        try:
            self.to_bus.send(pack_event(topic, type_name, body), zmq.NOBLOCK)
        except zmq.Again:
            self.counters["drops_bus"] += 1

    def _to_bookd_control(self, message, pair_index: int) -> None:
        if isinstance(message, ConnectionState) and message.up:
            self.seq = [0] * len(self.seq)
        self._to_bookd(pack_control(message, self.conn_id, pair_index))

    def _schedule(self, at_ns: int) -> None:
        if self._wake is not None:
            self._wake.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, (at_ns - time.time_ns()) / 1e9)
        self._wake = loop.call_later(delay, self._on_wake)

    def _on_wake(self) -> None:
        self._wake = None
        self.execute(self.session.on_timer(time.time_ns()))
        self.flush_bookd()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, a: act.Connect) -> None:
        self._conn_n += 1
        conn_id = self._conn_base | self._conn_n
        self._opening, self._early, self._early_closed = conn_id, [], False
        try:
            listener = await open_connection(a.url, self, conn_id, a.timeout_s,
                                             limit=self.max_frame, ssl_context=self.ssl_context)
        except ConnectError as e:
            self._opening = 0
            self.execute(self.session.on_connect_failed(time.time_ns(), str(e)))
            self.flush_bookd()
            return
        early, closed = self._early, self._early_closed
        self._opening, self._early, self._early_closed = 0, [], False
        if self._stopping.is_set():
            listener.close()
            return
        self.conn = listener
        self.conn_id = conn_id
        self.execute(self.session.on_connected(time.time_ns(), conn_id))
        self.flush_bookd()
        for payload in early:  # e.g. the status frame that came with the handshake
            self.on_text(conn_id, payload)
        if closed:
            self.on_closed(conn_id)

    # -- control socket and stats ------------------------------------------------------
    def poll_control(self) -> None:
        while True:
            try:
                msg = self.ctl.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                kind = unpack_header(msg)[0]
                req = decode_control(msg) if kind == CONTROL else None
            except MessageError as e:
                req = None
                log.warning("bad control message: %s", e)
            if not isinstance(req, ResyncRequest):
                self.counters["bad_control"] += 1
                continue
            self.counters["resync_requests"] += 1
            log.info("bookd asks for fresh snapshots of %s (%s)", ", ".join(req.pairs),
                     req.reason)
            # A restarted bookd has lost the PairInfos: send them again, before the
            # fresh snapshots, on the same ordered socket.
            for pair in req.pairs:
                info = self.session.pair_infos.get(pair)
                if info is not None:
                    self._to_bookd_control(info, self.pair_index.get(pair, 0))
            self.execute(self.session.request_resync(list(req.pairs), time.time_ns(),
                                                     req.conn_id))
            self.flush_bookd()

    def stats(self) -> None:
        counters = dict(self.session.counters)
        counters.update(self.counters)
        if self.recorder is not None:
            counters.update(self.recorder.counters())
        ev = StatsEvent(timestamp=ns_to_rfc3339(time.time_ns()), process="ingest",
                        pid=os.getpid(), counters=counters,
                        gauges={"connected": 1.0 if self.conn is not None else 0.0})
        self._to_bus("stats", "StatsEvent", _json.encode(ev))
        self._log_progress(counters)

    def _log_progress(self, counters: dict[str, int]) -> None:
        """One line per stats interval while frames flow: what was forwarded to bookd."""
        now = time.monotonic()
        fwd = counters["forwarded"]
        last_t, last_fwd = self._progress
        self._progress = (now, fwd)
        if fwd == last_fwd or not last_t:
            return
        log.info("forwarded %d book frames to bookd (%.0f/s; %d in all), dropped %d, "
                 "%d ws frames, %d decode errors", fwd - last_fwd,
                 (fwd - last_fwd) / (now - last_t), fwd, counters["drops_bookd"],
                 counters["ws_frames"], counters["decode_errors"])

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        log.info("ingest: %d pairs at depth %d from %s", len(self.pair_index),
                 self.cfg.data_ingestor.book_depth, self.url)
        self.execute(self.session.start(time.time_ns()))
        stats_every = self.cfg.bus.stats_interval_s
        next_stats = loop.time() + stats_every
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), 0.05)
            except TimeoutError:
                pass
            self.poll_control()
            if loop.time() >= next_stats:
                next_stats = loop.time() + stats_every
                self.stats()
        log.info("ingest: stopping")
        self.execute(self.session.stop(time.time_ns()))
        self.flush_bookd()
        for task in list(self._tasks):
            task.cancel()
        self.stats()
        return 0

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()  # drains its queue (bounded), closes the file
        if self._wake is not None:
            self._wake.cancel()
        for s in (self.to_bookd, self.to_bus, self.ctl):
            s.close()
        self.ctx.term()


def _ssl_context(ca_file: str | None) -> ssl.SSLContext | None:
    if not ca_file:
        return None
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(ca_file)
    return ctx


def main(cfg: Config, args) -> int:
    logging.basicConfig(level=cfg.system.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import uvloop

    cfg.run_path.mkdir(parents=True, exist_ok=True)
    url = resolve_url(cfg, getattr(args, "url", None))
    try:
        ssl_ctx = _ssl_context(getattr(args, "ca_file", None))
    except (OSError, ssl.SSLError) as e:
        log.error("cannot load --ca-file: %s", e)
        return 2
    recorder = None
    if getattr(args, "record", None):
        try:
            recorder = recorder_from_args(cfg, url, args.record, args)
        except RecordError as e:
            log.error("--record: %s", e)
            return 2
    try:
        app = IngestApp(cfg, url, ssl_context=ssl_ctx, recorder=recorder)
    except BaseException:
        if recorder is not None:
            recorder.close()
        raise
    try:
        return uvloop.run(app.run())
    finally:
        app.close()
