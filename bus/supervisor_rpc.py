"""supervisord's XML-RPC over its unix socket: ordered stops, shutdown, remote halts.

Pitfalls handled here (SUPERVISORD.md B.6):

* **Stale connection state.** supervisor's `SupervisorTransport` caches one HTTP
  connection; after a failed request every later call raises `CannotSendRequest`.
  `SupervisorRpc` therefore builds a **fresh proxy on every `.supervisor` access**, and
  the helpers retry transport errors with a new proxy each attempt.
* **Self-deadlock.** `stopProcess(name, wait=True)` is only safe from a process outside
  the target set. haltd is: it stops ingest, bookd and bus, never itself.

Public API::

    rpc = rpc_from_env()             # in a supervisord child (SUPERVISOR_SERVER_URL)
    rpc = rpc_for_socket(path)       # tests and scripts: the unix socket file
    rpc.supervisor.getState()        # any supervisor.* method, on a fresh proxy
    stop_in_order(rpc, ["ingest", "bookd", "bus"]) -> list[StopResult]
    shutdown(rpc) -> bool
    send_halt_remote(reason, source=..., error_code=..., pair=...) -> bool

Anything with a `.supervisor` attribute offering the same methods works as `rpc`
(tests pass a fake).
"""

from __future__ import annotations

import http.client
import logging
import os
import time
import xmlrpc.client
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec
from supervisor.xmlrpc import Faults, SupervisorTransport

log = logging.getLogger("bus.supervisor_rpc")

# Transport-level failures: retried with a fresh proxy. xmlrpc Faults are answers.
TRANSPORT_ERRORS = (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError)
# Faults a stop tolerates: the program is not running, does not exist, or supervisord
# is already shutting down (and stops everything itself, in priority order).
TOLERATED_STOP_FAULTS = {Faults.NOT_RUNNING: "NOT_RUNNING", Faults.BAD_NAME: "BAD_NAME",
                         Faults.SHUTDOWN_STATE: "SHUTDOWN_STATE"}
# getProcessInfo statenames of a process that still runs (or is about to).
ACTIVE_STATES = ("STARTING", "RUNNING", "BACKOFF")


class StopResult(msgspec.Struct, frozen=True, kw_only=True):
    """What one stopProcess call did."""

    program: str
    outcome: str  # "stopped", "NOT_RUNNING", "BAD_NAME", "SHUTDOWN_STATE", "error"
    detail: str = ""
    started_ns: int = 0  # unix ns
    ended_ns: int = 0


class SupervisorRpc:
    """An XML-RPC handle whose every `.supervisor` access uses a brand-new connection."""

    def __init__(self, serverurl: str, username: str = "", password: str = "") -> None:
        if not serverurl.startswith(("unix://", "http://")):
            raise ValueError(f"supervisord server URL must be unix:// or http://: {serverurl!r}")
        self.serverurl = serverurl
        self._user = username
        self._password = password

    def proxy(self) -> xmlrpc.client.ServerProxy:
        """A new ServerProxy with its own transport (no shared connection state)."""
        transport = SupervisorTransport(self._user, self._password, self.serverurl)
        # The URL is a placeholder: SupervisorTransport connects to serverurl itself.
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport)

    @property
    def supervisor(self) -> Any:
        return self.proxy().supervisor

    def __repr__(self) -> str:
        return f"SupervisorRpc({self.serverurl!r})"


def rpc_from_env(env: Mapping[str, str] | None = None) -> SupervisorRpc:
    """The RPC handle of the supervisord that started this process.

    Uses SUPERVISOR_SERVER_URL (and SUPERVISOR_USERNAME/PASSWORD), like
    `supervisor.childutils.getRPCInterface`; raises KeyError outside supervisord.
    """
    env = os.environ if env is None else env
    url = env.get("SUPERVISOR_SERVER_URL")
    if not url:
        raise KeyError("SUPERVISOR_SERVER_URL is not set: not running under supervisord")
    return SupervisorRpc(url, env.get("SUPERVISOR_USERNAME", ""),
                         env.get("SUPERVISOR_PASSWORD", ""))


def rpc_for_socket(path: str | os.PathLike[str]) -> SupervisorRpc:
    """The RPC handle for a supervisord listening on the unix socket `path`."""
    return SupervisorRpc(f"unix://{os.fspath(path)}")


def call(rpc: Any, method: str, *args: Any, attempts: int = 3, delay_s: float = 0.2) -> Any:
    """`rpc.supervisor.<method>(*args)`, retrying transport errors with a fresh proxy.

    xmlrpc Faults are raised at once (they are supervisord's answer, not a failure to
    reach it); the last transport error is raised after `attempts`.
    """
    for attempt in range(1, attempts + 1):
        try:
            return getattr(rpc.supervisor, method)(*args)
        except xmlrpc.client.Fault:
            raise
        except TRANSPORT_ERRORS as e:
            if attempt == attempts:
                raise
            log.warning("supervisord RPC %s%r failed (%s: %s); retrying with a new "
                        "connection (%d/%d)", method, args, type(e).__name__, e, attempt,
                        attempts)
            time.sleep(delay_s)
    raise AssertionError("unreachable")  # pragma: no cover


def _stop_one(rpc: Any, name: str, clock: Callable[[], int]) -> StopResult:
    start = clock()
    try:
        call(rpc, "stopProcess", name, True)
    except xmlrpc.client.Fault as f:
        label = TOLERATED_STOP_FAULTS.get(f.faultCode)
        if label is not None:
            log.info("stop %s: %s (%s)", name, label, f.faultString)
            return StopResult(program=name, outcome=label, detail=f.faultString,
                              started_ns=start, ended_ns=clock())
        log.error("stop %s failed: fault %d %s", name, f.faultCode, f.faultString)
        return StopResult(program=name, outcome="error",
                          detail=f"fault {f.faultCode}: {f.faultString}",
                          started_ns=start, ended_ns=clock())
    except TRANSPORT_ERRORS as e:
        log.error("stop %s failed: cannot reach supervisord: %s: %s", name,
                  type(e).__name__, e)
        return StopResult(program=name, outcome="error", detail=f"{type(e).__name__}: {e}",
                          started_ns=start, ended_ns=clock())
    end = clock()
    log.info("stopped %s in %.3f s", name, (end - start) / 1e9)
    return StopResult(program=name, outcome="stopped", started_ns=start, ended_ns=end)


def _still_active(rpc: Any, names: Sequence[str]) -> list[str]:
    try:
        infos = call(rpc, "getAllProcessInfo")
    except (xmlrpc.client.Fault, *TRANSPORT_ERRORS) as e:
        log.warning("cannot verify the stops: %s", e)
        return []
    state = {i["name"]: i["statename"] for i in infos}
    return [n for n in names if state.get(n) in ACTIVE_STATES]


def stop_in_order(rpc: Any, names: Sequence[str], *, verify: bool = True,
                  clock: Callable[[], int] = time.time_ns) -> list[StopResult]:
    """stopProcess(name, wait=True) for each name, strictly in order.

    Never call this with the caller's own program in `names` (self-deadlock, B.6).
    NOT_RUNNING, BAD_NAME and SHUTDOWN_STATE faults are logged and tolerated; any other
    failure is logged and the next program is still stopped (a halt stops as much as it
    can). With `verify`, programs that autorestart respawned meanwhile (a crash racing
    the halt) are stopped once more, in the same order.
    """
    results = [_stop_one(rpc, name, clock) for name in names]
    if verify:
        again = _still_active(rpc, names)
        if again:
            log.warning("still active after the ordered stop (respawned?): %s; stopping "
                        "them again", ", ".join(again))
            results.extend(_stop_one(rpc, name, clock) for name in again)
    return results


def shutdown(rpc: Any) -> bool:
    """supervisor.shutdown(): supervisord stops everything in priority order and exits."""
    try:
        call(rpc, "shutdown")
    except xmlrpc.client.Fault as f:
        if f.faultCode == Faults.SHUTDOWN_STATE:
            log.info("supervisord is already shutting down")
            return True
        log.error("shutdown refused: fault %d %s", f.faultCode, f.faultString)
        return False
    except TRANSPORT_ERRORS as e:
        log.error("shutdown failed: cannot reach supervisord: %s: %s", type(e).__name__, e)
        return False
    log.info("asked supervisord to shut down")
    return True


def remote_halt_data(reason: str, *, source: str | None = None,
                     error_code: str | None = None, pair: str | None = None) -> str:
    """The data of a remote halt: JSON `{"reason", "source", "error_code", "pair"}`."""
    body: dict[str, str] = {"reason": reason}
    for key, value in (("source", source), ("error_code", error_code), ("pair", pair)):
        if value:
            body[key] = value
    return msgspec.json.encode(body).decode()


def send_halt_remote(reason: str, *, source: str | None = None,
                     error_code: str | None = None, pair: str | None = None,
                     rpc: Any = None) -> bool:
    """Ask haltd for a halt through supervisord (REMOTE_COMMUNICATION of type "halt").

    The fallback when the bus is down; any process under supervisord can call it.
    `source` defaults to SUPERVISOR_PROCESS_NAME. Returns False (and logs) when
    supervisord cannot be reached; never raises for that.
    """
    source = source or os.environ.get("SUPERVISOR_PROCESS_NAME") or None
    data = remote_halt_data(reason, source=source, error_code=error_code, pair=pair)
    try:
        rpc = rpc if rpc is not None else rpc_from_env()
        call(rpc, "sendRemoteCommEvent", "halt", data)
    except KeyError as e:
        log.error("cannot send a remote halt: %s", e.args[0])
        return False
    except (xmlrpc.client.Fault, *TRANSPORT_ERRORS) as e:
        log.error("cannot send a remote halt (%s): %s", reason, e)
        return False
    log.warning("remote halt sent: %s", data)
    return True
