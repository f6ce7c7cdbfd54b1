"""The replay server: a Kraken v2 speaking picows server on uvloop (the I/O shell).

All decisions live in pure modules (replay/session.py per connection,
replay/faults.py server-wide, replay/frames.py for the bytes); this module owns the
listening socket, one picows listener per connection, the timers and the control
socket, and executes what the sessions return.

Usage from tests::

    server = ReplayServer(recording="capture.ndjson", price_precision=4, qty_precision=8,
                          speed="max")
    port = await server.start()            # ws://127.0.0.1:<port>/v2
    server.arm_fault("drop:after=10")
    ...
    await server.stop()

or, from synchronous code, `with run_in_thread(...) as h: h.port, h.arm_fault("stall")`.
`python -m replay` is the same server for subprocess use.

Writes: control frames (status, acks, pongs, heartbeats, fault frames) go through
`WSTransport.send`; data frames get a WebSocket header (cached per event, see
`SourceEvent.ws_header`) and go out in batches: one `write()` on the underlying
transport per pump, which keeps byte order with picows' own sends (both go through the
same transport buffer). Flow control: picows' `pause_writing`/`resume_writing` stop and
restart the pump, so a slow client makes the server queue nothing beyond the
transport's high-water mark (Kraken queues too; it never drops).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

from ingest.config import Config, ReplayConfig

from . import frames as F
from .faults import FaultSpec, FaultState
from .session import Counters, Request, Session, SessionConfig
from .source import RecordingSource, Source

__all__ = ["ReplayServer", "ReplayThread", "run_in_thread", "parse_speed"]

log = logging.getLogger("replay")
_TEXT = WSMsgType.TEXT


def parse_speed(value: str | float | int) -> float:
    """`max` -> 0.0 (as fast as possible), else a factor > 0 (1 = real time)."""
    if isinstance(value, str):
        if value.strip().lower() == "max":
            return 0.0
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"speed must be 'max' or a number > 0, got {value!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"speed must be 'max' or a number > 0, got {value!r}")
    return float(value)


class _Connection(WSListener):
    """One client: executes its Session's outputs on the picows transport."""

    def __init__(self, server: ReplayServer) -> None:
        self.server = server
        self.peer = "?"
        self.transport: WSTransport | None = None
        self.session: Session | None = None
        self.loop = server._loop
        self._handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self._handle_at = math.inf
        self._paused = False
        self._closed = False
        self._batch = min(256, server.session_config.batch)  # adapted to ~2-5 ms per pump

    # -- picows callbacks ----------------------------------------------------------------
    def on_ws_connected(self, transport: WSTransport) -> None:
        srv = self.server
        self.transport = transport
        peer = transport.underlying_transport.get_extra_info("peername")
        if peer:
            self.peer = f"{peer[0]}:{peer[1]}"
        self.session = Session(srv.source, srv.faults, srv._counters, srv.session_config)
        srv._conns.add(self)
        srv._counters.connections_total += 1
        log.info("connection %d from %s (connection_id %d)", srv._counters.connections_total,
                 self.peer, self.session.connection_id)
        transport.send(_TEXT, self.session.connect())
        if srv.faults.pending:
            for f in srv.faults.take_pending():
                self.inject(f)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        mt = frame.msg_type
        if mt == _TEXT:
            session = self.session
            assert session is not None
            reply = session.receive(frame.get_payload_as_bytes(), time.monotonic_ns(),
                                    time.time_ns())
            for f in reply.frames:
                transport.send(_TEXT, f)
            if reply.deferred is not None:
                self.loop.call_later(self.server.faults.slow_ack_ms / 1000, self._deferred,
                                     reply.deferred)
            self.kick()
        elif mt == WSMsgType.CLOSE:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
        elif mt == WSMsgType.BINARY:
            self.server._counters.bad_requests += 1

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._closed = True
        self._cancel()
        self.server._conns.discard(self)
        sent = self.session.frames_sent if self.session else 0
        log.info("connection from %s closed after %d data frames", self.peer, sent)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self.kick()

    # -- actions -------------------------------------------------------------------------
    def _deferred(self, req: Request) -> None:
        if self._closed or self.session is None or self.transport is None:
            return
        for f in self.session.execute(req, time.time_ns()):
            self.transport.send(_TEXT, f)
        self.kick()

    def send(self, payload: bytes) -> None:
        if not self._closed and self.transport is not None:
            self.transport.send(_TEXT, payload)

    def drop(self) -> None:
        if not self._closed and self.transport is not None:
            self.server._counters.drops += 1
            log.info("fault: dropping the connection from %s", self.peer)
            self.transport.disconnect(True)

    def inject(self, f: FaultSpec) -> None:
        """Deliver an immediate fault to this connection."""
        s = self.session
        if s is None or self._closed:
            return
        k = f.kind
        if k == "drop":
            self.drop()
        elif k == "garbage":
            self.send(F.garbage_frame())
        elif k == "truncated":
            self.send(F.truncated_frame(self._sample_book_frame()))
        elif k == "oversized":
            self.send(F.oversized_frame(f.nbytes))
        elif k == "status":
            self.send(s.status())

    def _sample_book_frame(self) -> bytes:
        s = self.session
        assert s is not None
        for sym in sorted(s.book_subs) or list(s.source.symbols):
            frame = s.current_snapshot(sym)
            if frame is not None:
                return frame
        return b""

    # -- the pump ------------------------------------------------------------------------
    def _cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self._handle_at = math.inf

    def kick(self) -> None:
        """Pump as soon as possible."""
        self._schedule(0)

    def _schedule(self, at: float) -> None:
        if self._closed or self._paused:
            return
        if self._handle is not None:
            if self._handle_at <= at:
                return
            self._cancel()
        if at == math.inf:
            return
        delay = (at - time.monotonic_ns()) / 1e9 if at else 0.0
        self._handle_at = at
        if delay <= 0:
            self._handle = self.loop.call_soon(self._pump)
        else:
            # uvloop runs a call_later of under 1 ms at once, so a shorter delay would
            # spin the pump; frames due within the millisecond go out together.
            self._handle = self.loop.call_later(max(delay, 0.001), self._pump)

    def _pump(self) -> None:
        self._handle = None
        self._handle_at = math.inf
        if self._closed or self._paused or self.session is None or self.transport is None:
            return
        t0 = time.perf_counter()
        r = self.session.pump(time.monotonic_ns(), time.time_ns(), self._batch)
        if r.next_at == 0:              # the batch was used up: keep a pump near 2-5 ms
            dt = time.perf_counter() - t0
            if dt > 0.005:
                self._batch = max(32, self._batch // 2)
            elif dt < 0.002:
                self._batch = min(self.server.session_config.batch, self._batch * 2)
        if r.parts:
            self.transport.underlying_transport.write(
                r.parts[0] if len(r.parts) == 1 else b"".join(r.parts))
        if r.drop:
            self.drop()
            return
        self._schedule(r.next_at)


class ReplayServer:
    """A Kraken v2 speaking WebSocket server serving a `Source` (see the module docstring).

    Settings come from explicit arguments, else from `cfg.replay`, else the defaults of
    `ReplayConfig`. `port=0` binds a free port (read it from `start()` or `.port`);
    without `port` and with `cfg` the configured (or namespace-derived) port is used.
    `control_port=None` runs no control socket; an int binds
    `tcp://127.0.0.1:<control_port>` (0: a free port), `control_endpoint` any ZMQ
    endpoint (e.g. `ipc://<run dir>/<ns>.replay.control`).
    """

    def __init__(self, source: Source | None = None, *, cfg: Config | None = None,
                 recording: str | Path | None = None, host: str | None = None,
                 port: int | None = None, control_port: int | None = None,
                 control_endpoint: str | None = None, speed: str | float = 1.0,
                 loop: bool = False, rate_burst: int | None = None,
                 rate_per_s: float | None = None, heartbeat_s: float | None = None,
                 price_precision: int | None = None, qty_precision: int | None = None,
                 depth: int | None = None, faults: Sequence[str] = (),
                 batch: int = 2048) -> None:
        if (source is None) == (recording is None):
            raise ValueError("ReplayServer needs exactly one of source= or recording=")
        if source is None:
            source = RecordingSource.from_path(recording, price_precision=price_precision,  # type: ignore[arg-type]
                                               qty_precision=qty_precision, depth=depth)
        self.source = source
        rc = cfg.replay if cfg is not None else ReplayConfig()
        self.host = host or rc.host
        if port is None:
            port = cfg.port("replay", "port") if cfg is not None else 0
        self._want_port = port
        self._control_endpoint = control_endpoint or (
            f"tcp://127.0.0.1:{control_port or '*'}" if control_port is not None else None)
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else rc.heartbeat_s
        self.session_config = SessionConfig(
            speed=parse_speed(speed), loop=loop,
            rate_burst=rate_burst if rate_burst is not None else rc.rate_burst,
            rate_per_s=rate_per_s if rate_per_s is not None else rc.rate_per_s,
            batch=batch)
        self._counters = Counters()
        self._conns: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.faults = FaultState(time.monotonic_ns, self._on_fault)
        for spec in faults:
            self.faults.arm(spec)
        self._server: asyncio.base_events.Server | None = None
        self._hb: asyncio.TimerHandle | None = None
        self._control: Any = None
        self.port = 0
        self.control_endpoint: str | None = None

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> int:
        """Bind and serve; returns the bound port."""
        self._loop = asyncio.get_running_loop()

        def factory(request: Any) -> _Connection:
            return _Connection(self)

        self._server = await ws_create_server(
            factory, self.host, self._want_port, websocket_handshake_timeout=5,
            max_frame_size=1 << 20, logger_name="replay")
        self.port = self._server.sockets[0].getsockname()[1]
        self._hb = self._loop.call_later(self.heartbeat_s, self._heartbeat)
        if self._control_endpoint is not None:
            from .control import ControlServer
            self._control = ControlServer(self, self._control_endpoint)
            self.control_endpoint = await self._control.start()
        log.info("serving %s", self.source.describe())
        return self.port

    async def stop(self) -> None:
        """Close every connection (close frame 1001), the listener and the control socket."""
        if self._hb is not None:
            self._hb.cancel()
            self._hb = None
        if self._control is not None:
            await self._control.stop()
            self._control = None
        conns = list(self._conns)
        for c in conns:
            c._cancel()
            if c.transport is not None and not c._closed:
                c.transport.send_close(WSCloseCode.GOING_AWAY, b"server stopping")
                c.transport.disconnect()
        if self._server is not None:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            except TimeoutError:
                log.warning("listener did not close within 2 s")
            self._server = None
        waits = [c.transport.wait_disconnected() for c in conns if c.transport is not None]
        if waits:
            await asyncio.wait([asyncio.ensure_future(w) for w in waits], timeout=2.0)

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/v2"

    # -- state ---------------------------------------------------------------------------
    @property
    def connections(self) -> int:
        return len(self._conns)

    @property
    def counters(self) -> dict[str, int]:
        d = self._counters.as_dict()
        d.update(self.source.stats())
        d["connections"] = len(self._conns)
        d["faults_armed"] = self.faults.armed
        for k, v in self.faults.fired.items():
            d[f"fault_{k}"] = v
        return d

    def status(self) -> dict:
        return {"url": self.url, "source": self.source.describe(),
                "system": self.faults.system, "faults": self.faults.describe(),
                "counters": self.counters}

    # -- faults --------------------------------------------------------------------------
    def arm_fault(self, spec: str | FaultSpec) -> FaultSpec:
        """Arm a fault (see replay/faults.py). Raises FaultError for a bad spec."""
        f = self.faults.arm(spec)
        log.info("fault armed: %s", f.text)
        return f

    def clear_faults(self) -> None:
        self.faults.clear()
        log.info("faults cleared")

    def _on_fault(self, spec: FaultSpec | None) -> None:
        if self._loop is None:
            return                      # armed before start: held for the first connection
        if self._conns and self.faults.pending:
            for f in self.faults.take_pending():
                for c in list(self._conns):
                    c.inject(f)
        for c in list(self._conns):
            c.kick()

    def _heartbeat(self) -> None:
        assert self._loop is not None
        self._hb = self._loop.call_later(self.heartbeat_s, self._heartbeat)
        if not self._conns or self.faults.all_stalled_until(time.monotonic_ns()):
            return
        for c in list(self._conns):
            if not c._closed and c.transport is not None:
                c.transport.send(_TEXT, F.HEARTBEAT)
                self._counters.heartbeats += 1


class ReplayThread:
    """A ReplayServer on its own uvloop in a daemon thread, for synchronous tests."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.server: ReplayServer | None = None
        self.port = 0
        self.control_endpoint: str | None = None
        self._thread = threading.Thread(target=self._run, name="replay-server", daemon=True)

    def start(self, timeout: float = 10.0) -> ReplayThread:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("replay server did not start")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        import uvloop
        loop = uvloop.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        try:
            self.server = ReplayServer(**self._kwargs)
            self.port = await self.server.start()
            self.control_endpoint = self.server.control_endpoint
        except BaseException as e:  # handed to the caller of start()
            self._error = e
            self._ready.set()
            return
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await self.server.stop()

    def call(self, fn: Any, *args: Any, timeout: float = 5.0) -> Any:
        """Run fn(*args) on the server's loop and return its result (or raise)."""
        assert self._loop is not None

        async def run() -> Any:
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v2"

    def arm_fault(self, spec: str) -> FaultSpec:
        assert self.server is not None
        return self.call(self.server.arm_fault, spec)

    def clear_faults(self) -> None:
        assert self.server is not None
        self.call(self.server.clear_faults)

    @property
    def counters(self) -> dict[str, int]:
        assert self.server is not None
        return self.call(lambda: self.server.counters)  # type: ignore[union-attr]

    @property
    def connections(self) -> int:
        return self.counters["connections"]

    def stop(self, timeout: float = 5.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def __enter__(self) -> ReplayThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_in_thread(**kwargs: Any) -> ReplayThread:
    """Start a ReplayServer(**kwargs) in a background thread; returns the started handle."""
    return ReplayThread(**kwargs).start()
