"""The replay server's control socket and its Python client.

A ZMQ REP socket, by default `tcp://127.0.0.1:<[replay] control_port>` (or any endpoint,
e.g. `ipc://<run dir>/<namespace>.replay.control`). One request, one reply. A request is
a text line, or the same as a JSON object:

=========================  ==============================  ================================
line                       JSON                            effect
=========================  ==============================  ================================
`fault SPEC`               `{"cmd":"fault","spec":SPEC}`   arm a fault (replay/faults.py)
`clear`                    `{"cmd":"clear"}`               remove every armed fault
`status`                   `{"cmd":"status"}`              counters, faults, system state
`synthetic-rate R`         `{"cmd":"synthetic-rate",`      set a live source's event rate
                           `"rate":R}`                     (events/s; synthetic sources)
`help`                     `{"cmd":"help"}`                the commands
=========================  ==============================  ================================

Every reply is one JSON object: `{"ok": true, ...}` or `{"ok": false, "error": "..."}`.
`status` replies `{"ok":true,"url":...,"source":...,"system":...,"faults":[...],
"counters":{...}}`.

Client: `ReplayControl("tcp://127.0.0.1:5555").fault("drop")`, `.clear()`,
`.status()`, `.synthetic_rate(500)`; errors raise `ControlError`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import msgspec
import zmq
import zmq.asyncio

from .faults import FaultError

if TYPE_CHECKING:
    from .server import ReplayServer

__all__ = ["ControlServer", "ReplayControl", "ControlError", "handle_command", "COMMANDS"]

log = logging.getLogger("replay")

COMMANDS = {
    "fault": "fault SPEC: arm a fault (see --help for the specs)",
    "clear": "clear: remove every armed fault",
    "status": "status: counters, faults in force and the system state, as JSON",
    "synthetic-rate": "synthetic-rate R: events per second of a live (synthetic) source",
    "help": "help: this list",
}


class ControlError(RuntimeError):
    """A control request that failed or timed out."""


def _parse(request: bytes) -> tuple[str, str]:
    text = request.decode("utf-8", "replace").strip()
    if text.startswith("{"):
        try:
            obj = msgspec.json.decode(text)
        except msgspec.DecodeError as e:
            raise ValueError(f"bad JSON request: {e}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("cmd"), str):
            raise ValueError('a JSON request needs "cmd"')
        arg = obj.get("spec", obj.get("rate", ""))
        return obj["cmd"].lower(), str(arg)
    cmd, _, arg = text.partition(" ")
    return cmd.lower(), arg.strip()


def handle_command(server: ReplayServer, request: bytes) -> dict[str, Any]:
    """Execute one control request against a server; returns the reply object."""
    try:
        cmd, arg = _parse(request)
    except ValueError as e:
        return {"ok": False, "error": str(e)}
    try:
        if cmd == "fault":
            if not arg:
                return {"ok": False, "error": "usage: fault SPEC"}
            f = server.arm_fault(arg)
            return {"ok": True, "armed": f.text}
        if cmd == "clear":
            server.clear_faults()
            return {"ok": True}
        if cmd == "status":
            return {"ok": True, **server.status()}
        if cmd == "synthetic-rate":
            try:
                rate = float(arg)
            except ValueError:
                return {"ok": False, "error": "usage: synthetic-rate R (events per second)"}
            if not rate > 0:
                return {"ok": False, "error": "the rate must be > 0"}
            try:
                server.source.set_rate(rate)
            except ValueError as e:
                return {"ok": False, "error": str(e)}
            return {"ok": True, "rate": rate}
        if cmd == "help":
            return {"ok": True, "commands": list(COMMANDS.values())}
        return {"ok": False, "error": f"unknown command {cmd!r}; known: {', '.join(COMMANDS)}"}
    except FaultError as e:
        return {"ok": False, "error": str(e)}
    except NotImplementedError as e:
        return {"ok": False, "error": str(e) or f"{cmd} is not supported by this source"}


class ControlServer:
    """The REP socket, served on the replay server's event loop. One owner: the server."""

    def __init__(self, server: ReplayServer, endpoint: str) -> None:
        self.server = server
        self.endpoint = endpoint
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> str:
        """Bind; returns the bound endpoint (with the real port for `tcp://...:*`)."""
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as e:
            sock.close()
            self._ctx.term()
            raise OSError(f"cannot bind the control socket {self.endpoint}: {e}") from None
        self._sock = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._task = asyncio.get_running_loop().create_task(self._serve())
        return self.endpoint

    async def _serve(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            request = await sock.recv()
            reply = handle_command(self.server, request)
            if not reply.get("ok"):
                log.info("control: %s -> %s", request[:200].decode("utf-8", "replace"),
                         reply.get("error"))
            await sock.send(msgspec.json.encode(reply))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, zmq.ZMQError):
                pass
            self._task = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None


class ReplayControl:
    """Synchronous client of the control socket (REQ, linger 0, timeout per request)."""

    def __init__(self, endpoint: str, timeout_s: float = 5.0) -> None:
        self.endpoint = endpoint
        self.timeout_ms = int(timeout_s * 1000)
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            s = self._ctx.socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
            s.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
            s.connect(self.endpoint)
            self._sock = s
        return self._sock

    def request(self, line: str) -> dict[str, Any]:
        """Send one request line; returns the reply object or raises ControlError."""
        s = self._socket()
        try:
            s.send_string(line)
            reply = msgspec.json.decode(s.recv())
        except zmq.Again:
            s.close(linger=0)          # a REQ socket cannot be reused after a timeout
            self._sock = None
            raise ControlError(f"no reply from {self.endpoint} within "
                               f"{self.timeout_ms / 1000:g} s") from None
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "request failed"))
        return reply

    def fault(self, spec: str) -> dict[str, Any]:
        return self.request(f"fault {spec}")

    def clear(self) -> dict[str, Any]:
        return self.request("clear")

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def synthetic_rate(self, rate: float) -> dict[str, Any]:
        return self.request(f"synthetic-rate {rate}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        self._ctx.term()

    def __enter__(self) -> ReplayControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
