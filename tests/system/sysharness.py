"""A real krakenfeed under a real supervisord, for system tests (SUPERVISORD.md B.10).

`System` renders the repository's supervisord.conf into a short temp dir (socket path
well under the AF_UNIX limit), points every program at a test config with its own
namespace (never containing the word krakenfeed), free ports and shrunken limits, starts
supervisord, and offers what the tests need: a bus subscriber collecting every
envelope, shared-memory readers, the replay control socket, XML-RPC, and a teardown that
leaves no process and no segment behind.
"""

from __future__ import annotations

import configparser
import http.client
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import xmlrpc.client
from pathlib import Path

import msgspec
import zmq

from bookd.layout import BookState
from bookd.reader import BookReader
from bus.supervisor_rpc import rpc_for_socket
from replay.control import ReplayControl
from tests.integration.harness import free_ports, wait_for

REPO = Path(__file__).resolve().parents[2]
PROGRAMS = ("replay", "bus", "bookd", "ingest")
_dec = msgspec.json.Decoder()


class Subscriber:
    """Collects every bus envelope (JSON PUB) in a background thread."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.events: list[tuple[float, str, dict]] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.sock.poll(100):
                msg = self.sock.recv()
                topic, _, payload = msg.partition(b" ")
                env = _dec.decode(payload)
                with self.lock:
                    self.events.append((time.monotonic(), topic.decode(), env))

    def since(self, t0: float) -> list[tuple[float, str, dict]]:
        with self.lock:
            return [e for e in self.events if e[0] >= t0]

    def find(self, t0: float, pred) -> list[tuple[float, str, dict]]:
        return [e for e in self.since(t0) if pred(e[1], e[2])]

    def wait(self, t0: float, pred, timeout: float, what: str):
        return wait_for(lambda: self.find(t0, pred), timeout, what=what)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close()
        self.ctx.term()


def system_event(code: str, pair: str | None = None, service: str | None = None):
    def pred(topic: str, env: dict) -> bool:
        ev = env["event"]
        return (topic == "system" and ev["status_code"] == code
                and (pair is None or ev.get("pair") == pair)
                and (service is None or ev.get("service_name") == service))
    return pred


class System:
    def __init__(self, pairs=("BTC/USD", "ETH/USD", "SOL/USD"), *, exit_on_halt: bool = False,
                 overrides: str = "") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sv"))
        self.ns = f"sys{os.getpid()}{uuid.uuid4().hex[:6]}"
        self.pairs = list(pairs)
        (self.json_port, self.msgpack_port, self.cache_port, self.replay_port,
         self.control_port) = free_ports(5)
        self.cfg = self.dir / "test.toml"
        self.cfg.write_text(self._toml(exit_on_halt, overrides))
        self.conf = self.dir / "supervisord.conf"
        self.sock = self.dir / "sv.sock"
        self._render()
        self.proc: subprocess.Popen | None = None
        self.sub: Subscriber | None = None
        self.child_pids: set[int] = set()

    # -- set-up ------------------------------------------------------------------------
    def _toml(self, exit_on_halt: bool, overrides: str) -> str:
        pairs = ", ".join(f'"{p}"' for p in self.pairs)
        base = f"""
[system]
namespace = "{self.ns}"
run_dir = "{self.dir}/run"
[trading]
pairs = [{pairs}]
[data_ingestor]
connection_timeout_s = 2.0
max_message_interval_s = 2.0
max_heartbeat_interval_s = 2.0
reconnect_delay_s = 0.1
max_reconnect_delay_s = 0.5
max_reconnect_attempts = 30
ohlc_intervals = ["1m"]
[ingest]
snapshot_timeout_s = 2.0
book_silence_s = 2.0
healthy_after_s = 2.0
halt_cooldown_s = 5.0
[bookd]
stale_after_s = 30.0
max_resyncs_before_halt = 3
resync_window_s = 60.0
stats_interval_s = 1.0
[bus]
json_port = {self.json_port}
msgpack_port = {self.msgpack_port}
cache_port = {self.cache_port}
stats_interval_s = 1.0
[haltd]
exit_on_halt = {"true" if exit_on_halt else "false"}
[replay]
port = {self.replay_port}
control_port = {self.control_port}
"""
        return _merge(base, overrides)

    def _render(self) -> None:
        cp = configparser.RawConfigParser(interpolation=None)
        cp.optionxform = str
        cp.read(REPO / "supervisord.conf")
        d = str(self.dir)
        cp.set("unix_http_server", "file", f"{d}/sv.sock")
        cp.set("supervisorctl", "serverurl", f"unix://{d}/sv.sock")
        cp.set("supervisord", "logfile", f"{d}/supervisord.log")
        cp.set("supervisord", "pidfile", f"{d}/supervisord.pid")
        cp.set("supervisord", "childlogdir", d)
        for section in cp.sections():
            for key, value in cp.items(section):
                value = (value.replace("%(here)s/.venv/bin/python", sys.executable)
                         .replace("%(here)s/etc/krakenfeed.toml", str(self.cfg))
                         .replace("%(here)s/run/%(program_name)s.log", f"{d}/%(program_name)s.log")
                         .replace("%(here)s/run/haltd.log", f"{d}/haltd.log")
                         .replace("%(here)s", str(REPO)))
                cp.set(section, key, value)
            if section.startswith("program:"):
                cp.set(section, "startsecs", "1")
        with open(self.conf, "w") as f:
            cp.write(f)

    # -- running ---------------------------------------------------------------------
    def start(self, wait_valid: bool = True) -> System:
        (self.dir / "run").mkdir(exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(self.conf)],
            cwd=self.dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        wait_for(self._daemon_running, 15, what="supervisord RUNNING")
        wait_for(self._programs_running, 20, what="all programs RUNNING")
        self.sub = Subscriber(f"tcp://127.0.0.1:{self.json_port}")
        if wait_valid:
            self.wait_all_valid(30)
        return self

    def rpc(self):
        return rpc_for_socket(str(self.sock)).supervisor

    def _daemon_running(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"supervisord exited {self.proc.returncode}: {self.log('supervisord')}")
        try:
            return self.rpc().getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Error, http.client.HTTPException):
            return False

    def infos(self) -> dict[str, dict]:
        return {i["name"]: i for i in self.rpc().getAllProcessInfo()}

    def _programs_running(self) -> bool:
        infos = self.infos()
        for name in PROGRAMS:
            st = infos[name]["statename"]
            if st in ("FATAL", "BACKOFF"):
                raise AssertionError(f"{name} {st}: {infos[name]['spawnerr']}\n{self.log(name)}")
        for info in infos.values():
            if info["pid"]:
                self.child_pids.add(info["pid"])
        return all(infos[n]["statename"] == "RUNNING" for n in PROGRAMS)

    def pid(self, name: str) -> int:
        return self.infos()[name]["pid"]

    def reader(self, pair: str, timeout: float = 15.0) -> BookReader:
        return BookReader.attach(pair, timeout=timeout, namespace=self.ns)

    def states(self) -> dict[str, BookState]:
        out = {}
        for pair in self.pairs:
            try:
                with self.reader(pair, timeout=0.2) as r:
                    out[pair] = r.state
            except Exception:  # not attached yet: bookd starting
                out[pair] = None
        return out

    def wait_all_valid(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = self.states()
            if all(st == BookState.VALID for st in states.values()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"books not all valid after {timeout:g} s: {states}\n"
                    f"halt.json: {self.halt_file().exists()}\n--- ingest.log\n"
                    f"{self.log('ingest')[-1500:]}\n--- bookd.log\n{self.log('bookd')[-1500:]}")
            time.sleep(0.1)

    def control(self) -> ReplayControl:
        return ReplayControl(f"tcp://127.0.0.1:{self.control_port}")

    def log(self, name: str) -> str:
        p = self.dir / f"{name}.log"
        return p.read_text(errors="replace")[-3000:] if p.exists() else f"(no {p})"

    def halt_file(self) -> Path:
        return self.dir / "run" / "halt.json"

    def stop(self) -> None:
        if self.sub is not None:
            self.sub.close()
            self.sub = None
        if self.proc is None:
            return
        try:
            for info in self.rpc().getAllProcessInfo():
                if info["pid"]:
                    self.child_pids.add(info["pid"])
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self._kill_children()
                self.proc.kill()
                self.proc.wait(5)
        self._kill_children()

    def _kill_children(self) -> None:
        for pid in self.child_pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def leftovers(self) -> tuple[list[int], list[str]]:
        """(child pids still alive, shm names of this namespace)."""
        alive = [p for p in self.child_pids if _alive(p)]
        segs = [n for n in os.listdir("/dev/shm") if n.startswith(self.ns)]
        return alive, segs

    def cleanup(self) -> None:
        self.stop()
        for name in os.listdir("/dev/shm"):
            if name.startswith(self.ns):
                os.unlink(f"/dev/shm/{name}")
        shutil.rmtree(self.dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _merge(base: str, overrides: str) -> str:
    """Apply `[section] key = value` lines of `overrides` onto the TOML text `base`."""
    if not overrides.strip():
        return base
    import tomllib

    data = tomllib.loads(base)
    for section, values in tomllib.loads(overrides).items():
        data.setdefault(section, {}).update(values)
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            lines.append(f"{k} = {msgspec.json.encode(v).decode()}")
    return "\n".join(lines) + "\n"
