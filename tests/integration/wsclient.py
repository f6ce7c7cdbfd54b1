"""A tiny picows WebSocket client for integration tests.

    async with WsClient.connect(url) as c:
        status = await c.recv_json()
        await c.send_json({"method": "ping", "req_id": 1})
        raw = await c.recv()          # bytes of the next text frame

Frames are queued as bytes (copied out of picows' buffer in the callback). After the
server closes, `recv()` raises `ConnectionClosed` once the queue is drained; `closed`
tells whether the connection is gone and `close_code` what the server said (None when
it just dropped the TCP connection).
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

_CLOSED = object()


class ConnectionClosed(Exception):
    pass


class _Listener(WSListener):
    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = False
        self.close_code: int | None = None

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
            self.queue.put_nowait(frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code().value)
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        self.queue.put_nowait(_CLOSED)


class WsClient:
    def __init__(self, transport: WSTransport, listener: _Listener) -> None:
        self.transport = transport
        self._l = listener

    @classmethod
    async def connect(cls, url: str, max_frame_size: int = 16 * 1024 * 1024) -> WsClient:
        transport, listener = await ws_connect(_Listener, url,
                                               max_frame_size=max_frame_size)
        return cls(transport, listener)

    @property
    def closed(self) -> bool:
        return self._l.closed

    @property
    def close_code(self) -> int | None:
        return self._l.close_code

    def send(self, payload: bytes | str) -> None:
        if isinstance(payload, str):
            payload = payload.encode()
        self.transport.send(WSMsgType.TEXT, payload)

    def send_json(self, obj: Any) -> None:
        self.send(msgspec.json.encode(obj))

    async def recv(self, timeout: float = 2.0) -> bytes:
        q = self._l.queue
        # a frame already queued is taken at once: against a server at --speed max in the
        # same loop, each extra loop iteration would cost a whole batch of frames
        item = q.get_nowait() if not q.empty() else await asyncio.wait_for(q.get(), timeout)
        if item is _CLOSED:
            self._l.queue.put_nowait(_CLOSED)  # stay closed for later calls
            raise ConnectionClosed()
        return item

    async def recv_json(self, timeout: float = 2.0) -> Any:
        return msgspec.json.decode(await self.recv(timeout))

    async def recv_until(self, pred: Any, timeout: float = 2.0, skip_heartbeats: bool = True
                         ) -> tuple[Any, list[bytes]]:
        """Receive until pred(decoded) is true; returns (match, raw frames before it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen: list[bytes] = []
        while True:
            raw = await self.recv(max(0.0, deadline - loop.time()))
            if skip_heartbeats and raw == b'{"channel":"heartbeat"}':
                continue
            try:
                msg = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                msg = None
            if msg is not None and pred(msg):
                return msg, seen
            seen.append(raw)

    def pending(self) -> list[bytes]:
        """Every frame already received, without waiting."""
        out = []
        while not self._l.queue.empty():
            item = self._l.queue.get_nowait()
            if item is _CLOSED:
                self._l.queue.put_nowait(_CLOSED)
                break
            out.append(item)
        return out

    async def wait_closed(self, timeout: float = 2.0) -> None:
        await asyncio.wait_for(self.transport.wait_disconnected(), timeout)

    async def close(self) -> None:
        if not self._l.closed:
            self.transport.send_close()
            self.transport.disconnect()
            try:
                await asyncio.wait_for(self.transport.wait_disconnected(), 1.0)
            except (TimeoutError, Exception):
                pass

    async def __aenter__(self) -> WsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
