"""Process harness for integration and system tests: configs, subprocesses, fake peers.

Everything a test starts is registered with a `Harness` and torn down by it, whatever
happens (terminate, then kill; sockets closed; temp dirs removed)::

    with Harness(tmp_path) as h:
        cfg = h.config(["BTC/USD"], ingest={"book_silence_s": 1.0})
        bookd, bus = h.bookd(cfg), h.bus(cfg)        # bound before ingest connects
        replay = h.replay(cfg, "--synthetic")        # .url, .control (ReplayControl)
        ingest = h.ingest(cfg, replay.url)           # subprocess.Popen (+ .lines)
        wait_for(lambda: bookd.frames(), 10, "a book frame")

The pieces work alone too: `make_config`, `start_replay`, `start_ingest`, `FakeBookd`,
`FakeBus`, `stop_process`, `wait_for`.

* `make_config(tmpdir, pairs, **overrides)` writes a TOML file with a unique namespace
  (never containing "krakenfeed"), a short run directory (`tempfile.mkdtemp(prefix="kf")`,
  ipc paths must stay short), free ports, and shrunken limits (`FAST`: liveness 1-2 s,
  backoff 0.1-0.5 s, snapshot timeout and book silence 1.5 s, heartbeats every 0.25 s,
  stats every 0.5 s). `overrides` are sections: `ingest={"send_hwm": 10}`.
* `FakeBookd` binds the PULL at `cfg.ipc("bookd")` and collects every message (header
  fields, payload, decoded control) on a reader thread, which can start paused
  (`reading=False`, a consumer that stops reading); `resync()` sends a ResyncRequest to
  `cfg.ipc("ingest.ctl")`.
* `FakeBus` binds the PULL at `cfg.ipc("bus.in")` and collects decoded events.

Nothing here asserts timing: `wait_for` only bounds waits.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import msgspec
import zmq

from ingest.config import Config, load_config
from ingest.messages import (
    CONTROL,
    EVENT,
    FRAME,
    ConnectionState,
    MessageError,
    PairInfo,
    ResyncRequest,
    Stale,
    decode_control,
    inner_messages,
    pack_control,
    split_event,
    unpack_header,
)

ROOT = Path(__file__).resolve().parents[2]
VECTORS = Path(os.environ.get("KRAKENFEED_VECTORS", ROOT.parent / "shared" / "kraken" / "vectors"))
CAPTURE = VECTORS / "depthcharge_kraken_minagbp_d25_20260816.ndjson"

# Shrunken limits: every timer of the system fires within a couple of seconds.
FAST: dict[str, dict[str, Any]] = {
    "data_ingestor": {"connection_timeout_s": 2.0, "max_message_interval_s": 2.0,
                      "max_heartbeat_interval_s": 1.5, "reconnect_delay_s": 0.1,
                      "max_reconnect_delay_s": 0.5},
    "ingest": {"snapshot_timeout_s": 1.5, "book_silence_s": 1.5},
    "bus": {"stats_interval_s": 0.5},
    "replay": {"heartbeat_s": 0.25},
}

T = TypeVar("T")


# ------------------------------------------------------------------------------------
# small helpers

def wait_for(predicate: Callable[[], T], timeout: float, what: str = "condition",
             interval: float = 0.02) -> T:
    """Poll `predicate` until it returns something truthy (returned); AssertionError
    naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (held open together while chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return msgspec.json.encode(v).decode()  # a JSON string is a TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def make_config(tmpdir: str | os.PathLike, pairs: Iterable[str],
                **overrides: dict[str, Any]) -> Path:
    """Write a test config into `tmpdir` and return its path (see the module docstring).

    The run directory is a fresh `tempfile.mkdtemp(prefix="kf")`: whoever calls this
    removes it (`Harness.config` does), e.g. `shutil.rmtree(load_config(p).run_path)`.
    """
    sections: dict[str, dict[str, Any]] = {k: dict(v) for k, v in FAST.items()}
    namespace = "kft" + secrets.token_hex(4)
    run_dir = tempfile.mkdtemp(prefix="kf")
    rp, cp, jp, mp, kp = free_ports(5)
    sections.setdefault("system", {}).update(namespace=namespace, run_dir=run_dir,
                                             log_level="INFO")
    sections["trading"] = {"pairs": list(pairs)}
    sections["replay"].update(host="127.0.0.1", port=rp, control_port=cp)
    sections["bus"].update(json_port=jp, msgpack_port=mp, cache_port=kp)
    for name, values in overrides.items():
        if not isinstance(values, dict):
            raise TypeError(f"override {name}= must be a dict of keys of [{name}]")
        sections.setdefault(name, {}).update(values)
    assert "krakenfeed" not in namespace
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path = Path(tmpdir) / f"{namespace}.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KRAKENFEED_CONFIG"}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class LoggedPopen(subprocess.Popen):
    """A Popen whose stderr is drained into `.lines` by a daemon thread (so the pipe
    never fills), with an event set when a line containing `ready_text` shows up."""

    def __init__(self, cmd: list[str], ready_text: str | None = None) -> None:
        super().__init__(cmd, cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         errors="replace")
        self.lines: list[str] = []
        self.ready_text = ready_text
        self.ready_line: str | None = None
        self.ready = threading.Event()
        self._drain = threading.Thread(target=self._read, daemon=True,
                                       name=f"drain-{self.pid}")
        self._drain.start()

    def _read(self) -> None:
        assert self.stderr is not None
        for line in self.stderr:
            self.lines.append(line.rstrip("\n"))
            if self.ready_text and self.ready_line is None and self.ready_text in line:
                self.ready_line = line.strip()
                self.ready.set()
        self.ready.set()  # EOF: the process is gone (ready_line stays None if never ready)

    def log(self, last: int = 60) -> str:
        return "\n".join(self.lines[-last:])

    def grep(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> int:
    """SIGTERM, wait up to `timeout`, then SIGKILL; returns the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    drain = getattr(proc, "_drain", None)
    if drain is not None:
        drain.join(2.0)
    if proc.stderr is not None:
        proc.stderr.close()
    return proc.returncode


# ------------------------------------------------------------------------------------
# the processes

class ReplayHandle:
    """A `python -m replay` subprocess: `.url`, `.port`, `.control_endpoint`,
    `.control` (a `replay.control.ReplayControl`), `.stop()`."""

    def __init__(self, proc: LoggedPopen, url: str, control_endpoint: str) -> None:
        self.proc = proc
        self.url = url
        self.port = int(url.rsplit(":", 1)[1].split("/")[0])
        self.control_endpoint = control_endpoint
        self._control: Any = None

    @property
    def control(self) -> Any:
        if self._control is None:
            from replay.control import ReplayControl
            self._control = ReplayControl(self.control_endpoint)
        return self._control

    def fault(self, spec: str) -> dict:
        return self.control.fault(spec)

    def status(self) -> dict:
        return self.control.status()

    def stop(self) -> int:
        if self._control is not None:
            self._control.close()
            self._control = None
        return stop_process(self.proc)


def start_replay(cfg_path: str | os.PathLike, *args: str, timeout: float = 20.0) -> ReplayHandle:
    """Start `python -m replay --config CFG --port 0 --control-port 0 ARGS...` and wait
    for its ready line `replay: listening on ws://HOST:PORT/v2 (control tcp://...)`."""
    cmd = [sys.executable, "-m", "replay", "--config", str(cfg_path), "--port", "0",
           "--control-port", "0", *args]
    proc = LoggedPopen(cmd, ready_text="listening on ")
    if not proc.ready.wait(timeout) or proc.ready_line is None:
        stop_process(proc)
        raise RuntimeError(f"replay did not get ready:\n{proc.log()}")
    line = proc.ready_line
    url = line.split("listening on ", 1)[1].split()[0]
    endpoint = line.split("(control ", 1)[1].rstrip(")") if "(control " in line else ""
    return ReplayHandle(proc, url, endpoint)


def start_ingest(cfg_path: str | os.PathLike, url: str, *args: str) -> LoggedPopen:
    """Start `python -m ingest --config CFG --url URL ARGS...` (as in production)."""
    return LoggedPopen([sys.executable, "-m", "ingest", "--config", str(cfg_path),
                        "--url", url, *args])


# ------------------------------------------------------------------------------------
# fake peers

class _Collector:
    """A PULL socket bound at an endpoint, read by a daemon thread into `self.items`."""

    def __init__(self, endpoint: str, rcvhwm: int | None = None, reading: bool = True) -> None:
        self.endpoint = endpoint
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        if rcvhwm is not None:
            self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
            self.sock.setsockopt(zmq.RCVBUF, 4096)
        self.sock.bind(endpoint)
        self.items: list[Any] = []
        self.errors: list[str] = []
        self._reading = threading.Event()
        if reading:
            self._reading.set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"pull-{endpoint}")
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not self._reading.wait(0.05):
                    continue
                if not poller.poll(50):
                    continue
                while True:
                    try:
                        msg = self.sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        t = time.monotonic()
                        # The real receivers unwrap BATCH messages; so do the fakes.
                        for inner in inner_messages(msg):
                            self.items.append(self.decode(inner, t))
                    except (MessageError, msgspec.DecodeError, UnicodeDecodeError) as e:
                        self.errors.append(f"{e}: {msg[:100]!r}")
        finally:
            self.sock.close(0)

    def decode(self, msg: bytes, t: float) -> Any:
        raise NotImplementedError

    def start_reading(self) -> None:
        self._reading.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.ctx.term()


class BookdMsg(NamedTuple):
    kind: int  # FRAME or CONTROL
    pair_index: int
    conn_id: int
    seq: int
    recv_ns: int
    payload: bytes  # the raw frame (FRAME) or the msgpack body (CONTROL)
    control: Any  # the decoded Control Struct, None for a FRAME
    t: float  # time.monotonic() when the fake received it

    @property
    def is_snapshot(self) -> bool:
        return self.kind == FRAME and self.payload.startswith(
            b'{"channel":"book","type":"snapshot"')


class FakeBookd(_Collector):
    """bookd's end of the ingest sockets (see the module docstring)."""

    def __init__(self, cfg: Config | str | os.PathLike, *, rcvhwm: int | None = None,
                 reading: bool = True) -> None:
        self.cfg = cfg if isinstance(cfg, Config) else load_config(cfg)
        self.pairs = tuple(self.cfg.trading.pairs)
        super().__init__(self.cfg.ipc("bookd"), rcvhwm, reading)
        self.ctl = self.ctx.socket(zmq.PUSH)
        self.ctl.setsockopt(zmq.LINGER, 500)
        self.ctl.connect(self.cfg.ipc("ingest.ctl"))

    def decode(self, msg: bytes, t: float) -> BookdMsg:
        kind, pair_index, conn_id, seq, recv_ns = unpack_header(msg)
        control = decode_control(msg) if kind == CONTROL else None
        return BookdMsg(kind, pair_index, conn_id, seq, recv_ns, msg[32:], control, t)

    # -- queries (snapshots of what arrived so far) ----------------------------------
    def messages(self) -> list[BookdMsg]:
        return list(self.items)

    def frames(self, pair: str | None = None, conn_id: int | None = None,
               since: int = 0) -> list[BookdMsg]:
        """FRAME messages from index `since` of `messages()`, filtered."""
        idx = None if pair is None else self.pairs.index(pair)
        return [m for m in self.items[since:] if m.kind == FRAME
                and (idx is None or m.pair_index == idx)
                and (conn_id is None or m.conn_id == conn_id)]

    def controls(self, cls: type | None = None, since: int = 0) -> list[Any]:
        return [m.control for m in self.items[since:]
                if m.kind == CONTROL and (cls is None or isinstance(m.control, cls))]

    def pair_infos(self, since: int = 0) -> list[PairInfo]:
        return self.controls(PairInfo, since)

    def stales(self, since: int = 0) -> list[Stale]:
        return self.controls(Stale, since)

    def conn_states(self, since: int = 0) -> list[ConnectionState]:
        return self.controls(ConnectionState, since)

    def up_conn_ids(self) -> list[int]:
        return [c.conn_id for c in self.conn_states() if c.up]

    def current_conn(self) -> int | None:
        """The conn id of the last ConnectionState up (None if none yet, or if the last
        state was down)."""
        states = self.conn_states()
        return states[-1].conn_id if states and states[-1].up else None

    def snapshots_of_all(self, conn_id: int, since: int = 0) -> bool:
        """True when every configured pair has had a snapshot on `conn_id`."""
        seen = {m.pair_index for m in self.frames(conn_id=conn_id, since=since)
                if m.is_snapshot}
        return seen >= set(range(len(self.pairs)))

    def resync(self, pairs: Iterable[str], conn_id: int = 0, reason: str = "test") -> None:
        self.ctl.send(pack_control(ResyncRequest(tuple(pairs), reason, conn_id)))

    def close(self) -> None:
        self.ctl.close(0)
        super().close()


class BusEvent(NamedTuple):
    topic: str
    type: str
    event: dict
    t: float


class FakeBus(_Collector):
    """The bus's `bus.in` PULL: every producer event, decoded (topic, type, json)."""

    def __init__(self, cfg: Config | str | os.PathLike, *, reading: bool = True) -> None:
        self.cfg = cfg if isinstance(cfg, Config) else load_config(cfg)
        super().__init__(self.cfg.ipc("bus.in"), None, reading)

    def decode(self, msg: bytes, t: float) -> BusEvent:
        kind = unpack_header(msg)[0]
        if kind != EVENT:
            raise MessageError(f"message kind {kind} on bus.in")
        topic, type_name, body = split_event(msg)
        return BusEvent(topic, type_name, msgspec.json.decode(body), t)

    def events(self, topic: str | None = None, type_name: str | None = None,
               since: int = 0) -> list[BusEvent]:
        return [e for e in self.items[since:] if (topic is None or e.topic == topic)
                and (type_name is None or e.type == type_name)]

    def system(self, code: str | None = None, pair: str | None = None,
               since: int = 0) -> list[dict]:
        """SystemStateEvent bodies, optionally with that status_code and pair."""
        return [e.event for e in self.events(type_name="SystemStateEvent", since=since)
                if (code is None or e.event["status_code"] == code)
                and (pair is None or e.event.get("pair") == pair)]

    def codes(self, since: int = 0) -> list[str]:
        return [ev["status_code"] for ev in self.system(since=since)]

    def stats(self, process: str = "ingest", since: int = 0) -> list[dict]:
        """StatsEvent counters of `process`, oldest first."""
        return [e.event["counters"] for e in self.events(type_name="StatsEvent", since=since)
                if e.event["process"] == process]

    def counter(self, name: str, process: str = "ingest") -> int:
        """The last reported value of a counter (0 before the first StatsEvent)."""
        s = self.stats(process)
        return s[-1].get(name, 0) if s else 0


# ------------------------------------------------------------------------------------
# the registry

class Harness:
    """Starts things and tears every one of them down (see the module docstring)."""

    def __init__(self, tmpdir: str | os.PathLike) -> None:
        self.tmpdir = Path(tmpdir)
        self._procs: list[tuple[str, subprocess.Popen]] = []
        self._closers: list[Callable[[], Any]] = []
        self._dirs: list[Path] = []

    def config(self, pairs: Iterable[str], **overrides: dict[str, Any]) -> Path:
        path = make_config(self.tmpdir, pairs, **overrides)
        self._dirs.append(load_config(path).run_path)
        return path

    def replay(self, cfg: str | os.PathLike, *args: str) -> ReplayHandle:
        h = start_replay(cfg, *args)
        self._procs.append(("replay", h.proc))
        self._closers.append(h.stop)
        return h

    def ingest(self, cfg: str | os.PathLike, url: str, *args: str) -> LoggedPopen:
        p = start_ingest(cfg, url, *args)
        self._procs.append(("ingest", p))
        return p

    def bookd(self, cfg: str | os.PathLike, **kw: Any) -> FakeBookd:
        b = FakeBookd(cfg, **kw)
        self._closers.append(b.close)
        return b

    def bus(self, cfg: str | os.PathLike, **kw: Any) -> FakeBus:
        b = FakeBus(cfg, **kw)
        self._closers.append(b.close)
        return b

    def logs(self) -> str:
        out = []
        for name, p in self._procs:
            if isinstance(p, LoggedPopen):
                out.append(f"----- {name} (pid {p.pid}, rc {p.returncode}) -----\n{p.log()}")
        return "\n".join(out)

    def close(self) -> None:
        for _, p in reversed(self._procs):  # ingest first: it is the last started
            stop_process(p)
        for fn in reversed(self._closers):
            with contextlib.suppress(Exception):
                fn()
        for d in self._dirs:
            shutil.rmtree(d, ignore_errors=True)

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is not None:
                print(self.logs())  # shown by pytest next to the failure
        finally:
            self.close()
