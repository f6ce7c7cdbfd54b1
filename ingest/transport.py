"""picows glue: one WebSocket connection, its frames handed to a sink as bytes.

`FeedListener` is the picows listener of one connection. It copies each text message
out of picows' receive buffer (a `WSFrame` is only valid inside `on_ws_frame`),
reassembles fragmented messages, answers CLOSE, and hands complete messages to the
sink's `on_text(conn_id, payload, last)`; `last` is picows' `last_in_buffer`: no other
complete frame follows in this socket read, so the sink can flush what it batched. Binary messages and protocol oddities are counted
by the sink (`on_binary`), never raised: a raise inside a picows callback would drop
the connection.

`open_connection` maps every way a connect can fail (refused, DNS, TLS, handshake,
timeout) to `ConnectError` with a readable reason, the only exception the app sees.
For `wss://` it uses TLS with SNI (picows passes the URL's host as server_hostname);
`ssl_context` can carry a private CA for tests.
"""

from __future__ import annotations

import asyncio
import ssl

from picows import WSListener, WSMsgType, WSTransport, ws_connect

# picows' own frame limit: well above our [ingest] max_frame_bytes (counted and dropped
# by the app) and the ~0.6 MB live instrument snapshot; beyond it picows disconnects.
PICOWS_MAX_FRAME = 16 * 1024 * 1024


class ConnectError(Exception):
    """A connection attempt failed; str() is the reason for the log and the session."""


class FeedListener(WSListener):
    __slots__ = ("sink", "conn_id", "transport", "_parts", "_parts_len", "_limit")

    def __init__(self, sink, conn_id: int, limit: int) -> None:
        self.sink = sink
        self.conn_id = conn_id
        self.transport: WSTransport | None = None
        self._parts: list[bytes] | None = None
        self._parts_len = 0
        self._limit = limit

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame) -> None:
        t = frame.msg_type
        if t == WSMsgType.TEXT:
            if frame.fin:
                self.sink.on_text(self.conn_id, frame.get_payload_as_bytes(),
                                  frame.last_in_buffer)
            else:
                self._parts = [frame.get_payload_as_bytes()]
                self._parts_len = len(self._parts[0])
        elif t == WSMsgType.CONTINUATION:
            if self._parts is None:
                self.sink.on_binary(self.conn_id, "continuation without a start")
                return
            if self._parts_len <= self._limit:  # keep counting, stop storing
                part = frame.get_payload_as_bytes()
                self._parts.append(part)
                self._parts_len += len(part)
            else:
                self._parts_len += frame.payload_size
            if frame.fin:
                parts, self._parts = self._parts, None
                if self._parts_len > self._limit:
                    self.sink.on_oversized(self.conn_id, self._parts_len)
                else:
                    self.sink.on_text(self.conn_id, b"".join(parts), frame.last_in_buffer)
        elif t == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
        elif t == WSMsgType.BINARY:
            self.sink.on_binary(self.conn_id, "binary message")
        # PING is answered by picows (enable_auto_pong); PONG needs nothing.

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.sink.on_closed(self.conn_id)

    def send_text(self, text: bytes) -> None:
        if self.transport is not None:
            self.transport.send(WSMsgType.TEXT, text)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.disconnect(graceful=False)


async def open_connection(url: str, sink, conn_id: int, timeout_s: float, *,
                          limit: int, ssl_context: ssl.SSLContext | None = None
                          ) -> FeedListener:
    """Connect within `timeout_s`; raises ConnectError with a readable reason."""
    kwargs = {}
    if url.startswith("wss://"):
        kwargs["ssl_context"] = ssl_context or ssl.create_default_context()
    try:
        _, listener = await asyncio.wait_for(
            ws_connect(lambda: FeedListener(sink, conn_id, limit), url,
                       websocket_handshake_timeout=timeout_s,
                       max_frame_size=max(PICOWS_MAX_FRAME, 2 * limit),
                       enable_auto_pong=True, **kwargs),
            timeout_s)
    except TimeoutError:
        raise ConnectError(f"no connection within {timeout_s:g} s") from None
    except ssl.SSLError as e:
        raise ConnectError(f"TLS: {e.reason or e}") from None
    except OSError as e:
        raise ConnectError(e.strerror or str(e)) from None
    except Exception as e:  # picows' handshake errors and anything else at the edge
        raise ConnectError(f"{type(e).__name__}: {e}") from None
    return listener
