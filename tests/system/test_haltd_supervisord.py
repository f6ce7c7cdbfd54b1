"""haltd under a REAL supervisord (SUPERVISORD.md B.10): ordered halt, crash loops.

Three dummy programs named ingest, bookd and bus log their start, SIGTERM and exit
times to a file and exit 0 on SIGTERM after a short drain; haltd is the event listener.
Each test renders its own config into a short temp dir (the unix socket path must stay
under ~100 bytes), uses its own namespace, and cleans up every process and file.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from bus import schema
from bus.haltd import HALT_FILE, read_halt_record
from bus.supervisor_rpc import rpc_for_socket
from ingest.config import load_config
from ingest.messages import split_event, unpack_header

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
PROGRAMS = ("bus", "bookd", "ingest")  # start order (priority 100, 200, 300)
STOP_ORDER = ["ingest", "bookd", "bus"]
RPC_ERRORS = (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError,
              http.client.HTTPException)

DUMMY = '''\
import os, signal, sys, time

name, log, halt_file = sys.argv[1], sys.argv[2], sys.argv[3]


def write(what):
    with open(log, "a") as f:
        f.write(f"{name} {what} {time.time_ns()} {os.getpid()}\\n")


def on_term(signum, frame):
    # like bookd: on a stop, look for the halt record (haltd writes it first)
    write("sigterm-halted" if os.path.exists(halt_file) else "sigterm-plain")
    write("sigterm")
    time.sleep(0.1)  # a short drain, like the real processes
    write("exit")
    sys.exit(0)


signal.signal(signal.SIGTERM, on_term)
write("start")
while True:
    signal.pause()
'''

PROGRAM = """
[program:{name}]
command={python} %(here)s/dummy.py %(program_name)s %(here)s/events.log %(here)s/run/halt.json
priority={priority}
startsecs=0
startretries=3
autorestart=unexpected
exitcodes=0
stopsignal=TERM
stopwaitsecs=5
stopasgroup=true
killasgroup=true
redirect_stderr=true
stdout_logfile=%(here)s/%(program_name)s.log
"""

SUPERVISORD_CONF = """
[unix_http_server]
file=%(here)s/s.sock
chmod=0700

[supervisord]
nodaemon=true
logfile=%(here)s/supervisord.log
pidfile=%(here)s/supervisord.pid
childlogdir=%(here)s
identifier=svtest
environment=PYTHONUNBUFFERED="1",PYTHONPATH="{repo}"

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://%(here)s/s.sock
{programs}
[eventlistener:haltd]
command={python} -m bus.haltd --config %(here)s/test.toml {haltd_flag}
directory={repo}
events=PROCESS_STATE_EXITED,PROCESS_STATE_FATAL,REMOTE_COMMUNICATION
priority=50
autorestart=true
startsecs=1
buffer_size=100
stdout_logfile=NONE
stderr_logfile=%(here)s/haltd.log
redirect_stderr=false
"""

TOML = """
[system]
namespace = "{namespace}"
run_dir = "run"

[trading]
pairs = ["BTC/USD"]

[haltd]
exit_on_halt = {exit_on_halt}
crash_loop_count = 3
crash_loop_window_s = 60.0
"""


class Supervisord:
    """One supervisord in a short temp dir, with the dummies and haltd."""

    def __init__(self, *, haltd_flag: str, exit_on_halt_in_config: bool) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sv"))
        (self.dir / "run").mkdir()
        self.namespace = f"svt{os.getpid()}"
        self.sock = self.dir / "s.sock"
        assert len(str(self.sock)) < 100
        (self.dir / "dummy.py").write_text(DUMMY)
        (self.dir / "test.toml").write_text(TOML.format(
            namespace=self.namespace, exit_on_halt=str(exit_on_halt_in_config).lower()))
        programs = "".join(PROGRAM.format(name=n, python=sys.executable, priority=p)
                           for n, p in zip(PROGRAMS, (100, 200, 300), strict=True))
        (self.dir / "supervisord.conf").write_text(SUPERVISORD_CONF.format(
            repo=REPO, python=sys.executable, programs=programs, haltd_flag=haltd_flag))
        self.cfg = load_config(self.dir / "test.toml")
        self.halt_path = self.cfg.run_path / HALT_FILE
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SUPERVISOR_") and k != "KRAKENFEED_CONFIG"}
        env["PYTHONPATH"] = str(REPO)
        self._out = open(self.dir / "supervisord.out", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-n", "-c",
             str(self.dir / "supervisord.conf")],
            cwd=self.dir, env=env, stdout=self._out, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.child_pids: set[int] = set()

    # -- RPC ---------------------------------------------------------------------------
    @property
    def sv(self) -> Any:
        return rpc_for_socket(self.sock).supervisor  # a fresh connection per call

    def diagnostics(self) -> str:
        parts = []
        for name in ("supervisord.out", "haltd.log", "events.log"):
            p = self.dir / name
            if p.exists():
                parts.append(f"--- {name}\n{p.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def infos(self) -> dict[str, dict[str, Any]]:
        infos = {i["name"]: i for i in self.sv.getAllProcessInfo()}
        self.child_pids.update(i["pid"] for i in infos.values() if i["pid"])
        return infos

    def wait_running(self, timeout: float = 15.0) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"supervisord exited\n{self.diagnostics()}"
            try:
                if self.sv.getState()["statename"] == "RUNNING":
                    infos = self.infos()
                    bad = {n: i for n, i in infos.items() if i["statename"] in ("FATAL",)}
                    assert not bad, f"{bad}\n{self.diagnostics()}"
                    if all(infos[n]["statename"] == "RUNNING" for n in (*PROGRAMS, "haltd")):
                        return infos
            except RPC_ERRORS:
                pass
            time.sleep(0.05)
        raise AssertionError(f"not all RUNNING within {timeout} s\n{self.diagnostics()}")

    def wait_for(self, cond: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = cond()
            except RPC_ERRORS:
                value = None
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}\n{self.diagnostics()}")

    def kill9(self, name: str) -> int:
        """SIGKILL a program, then wait until supervisord has respawned it."""
        pid = self.infos()[name]["pid"]
        os.kill(pid, signal.SIGKILL)
        self.wait_for(lambda: (i := self.infos()[name])["statename"] == "RUNNING"
                      and i["pid"] not in (0, pid), 10, f"{name} respawned after kill")
        return pid

    # -- the dummies' log --------------------------------------------------------------
    def events(self) -> list[tuple[str, str, int, int]]:
        p = self.dir / "events.log"
        if not p.exists():
            return []
        out = []
        for line in p.read_text().splitlines():
            name, what, ns, pid = line.split()
            out.append((name, what, int(ns), int(pid)))
        return out

    def times(self, what: str) -> dict[str, int]:
        return {n: ns for n, w, ns, _ in self.events() if w == what}

    # -- teardown ----------------------------------------------------------------------
    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.infos()
                    self.sv.shutdown()
                except RPC_ERRORS:
                    self.proc.terminate()
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    for pid in self.child_pids:  # last resort: each child's group
                        try:
                            os.killpg(pid, signal.SIGKILL)
                        except (ProcessLookupError, PermissionError):
                            pass
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        finally:
            self._out.close()
            pids = self.child_pids | {pid for *_, pid in self.events()}
            orphans = [pid for pid in pids if _alive(pid)]
            for pid in orphans:
                os.kill(pid, signal.SIGKILL)
            shutil.rmtree(self.dir, ignore_errors=True)
            assert not orphans, f"orphaned processes: {orphans}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


@pytest.fixture
def make_supervisord() -> Iterator[Any]:
    started: list[Supervisord] = []

    def make(**kw: Any) -> Supervisord:
        s = Supervisord(**kw)
        started.append(s)
        return s

    yield make
    for s in started:
        s.close()


def assert_ordered_stop(s: Supervisord) -> tuple[dict[str, int], dict[str, int]]:
    term, exit_ = s.times("sigterm"), s.times("exit")
    assert set(term) == set(STOP_ORDER), s.diagnostics()
    # strictly sequential: each program got SIGTERM only after the previous one exited
    assert term["ingest"] < exit_["ingest"] < term["bookd"] < exit_["bookd"] < term["bus"]
    assert [n for n, w, *_ in s.events() if w == "sigterm"] == STOP_ORDER
    # every program saw run/halt.json when its SIGTERM came: written before any stop
    assert [n for n, w, *_ in s.events() if w == "sigterm-halted"] == STOP_ORDER
    return term, exit_


def test_remote_halt_stops_in_order_and_shuts_down(make_supervisord: Any) -> None:
    # the config says exit_on_halt = false; the flag wins
    s = make_supervisord(haltd_flag="--exit-on-halt", exit_on_halt_in_config=False)
    s.wait_running()
    t_trigger = time.time_ns()
    s.sv.sendRemoteCommEvent("halt", "test reason")
    assert s.proc.wait(timeout=20) == 0, s.diagnostics()  # exit_on_halt: supervisord exits
    rec = read_halt_record(s.halt_path)
    assert rec.decision.reason.endswith("test reason")
    assert rec.decision.triggers[0].reason == "test reason"
    assert rec.decision.stopped == STOP_ORDER
    assert rec.completed and rec.exit_on_halt
    assert [(r.program, r.outcome) for r in rec.stop_results] == [
        (n, "stopped") for n in STOP_ORDER]
    term, exit_ = assert_ordered_stop(s)
    log = (s.dir / "supervisord.log").read_text()
    assert "stopped: haltd (exit status 0)" in log, s.diagnostics()
    print(f"\nremote halt: trigger -> ingest SIGTERM {(term['ingest'] - t_trigger) / 1e6:.0f} ms, "
          f"-> all stopped {(exit_['bus'] - t_trigger) / 1e6:.0f} ms, "
          f"stops {[(r.program, round((r.ended_ns - r.started_ns) / 1e6)) for r in rec.stop_results]} ms")


def test_single_kills_do_not_halt_but_a_crash_loop_does(make_supervisord: Any) -> None:
    s = make_supervisord(haltd_flag="--exit-on-halt", exit_on_halt_in_config=False)
    s.wait_running()
    for name in STOP_ORDER:  # one kill of each program: respawned, no halt
        s.kill9(name)
    time.sleep(2.0)
    assert not s.halt_path.exists(), s.diagnostics()
    infos = s.wait_running()
    assert all(infos[n]["statename"] == "RUNNING" for n in PROGRAMS)
    assert "crash 1 of 3" in (s.dir / "haltd.log").read_text()

    killed = [s.kill9("bookd")]  # bookd's 2nd crash within the window: still no halt
    t_trigger = time.time_ns()
    pid = s.infos()["bookd"]["pid"]
    os.kill(pid, signal.SIGKILL)  # 3rd: crash loop
    killed.append(pid)
    assert s.proc.wait(timeout=20) == 0, s.diagnostics()
    rec = read_halt_record(s.halt_path)
    assert rec.decision.reason.startswith("crash loop: bookd exited unexpectedly 3 times")
    assert [t.source for t in rec.decision.triggers] == ["bookd"] * 3
    assert all(t.error_code == "UNEXPECTED_EXIT" for t in rec.decision.triggers)
    assert f"pid {killed[-1]}" in rec.decision.triggers[-1].reason
    # the kills of ingest and bus are history, not evidence
    assert {e.program for e in rec.history} >= {"ingest", "bus"}
    term, exit_ = s.times("sigterm"), s.times("exit")
    # bookd may or may not have been respawned before the halt reached it
    assert term["ingest"] < exit_["ingest"] < term["bus"]
    if "bookd" in term:
        assert exit_["ingest"] < term["bookd"] < exit_["bookd"] < term["bus"]
    assert not [e for e in s.events() if e[1] == "sigterm-plain"]  # halt.json came first
    assert [r.program for r in rec.stop_results][:3] == STOP_ORDER
    print(f"\ncrash loop: 3rd kill -> all stopped {(exit_['bus'] - t_trigger) / 1e6:.0f} ms")


def test_bus_trigger_halts_and_supervisord_keeps_running(make_supervisord: Any) -> None:
    import zmq

    # the config says exit_on_halt = true; --no-exit-on-halt wins
    s = make_supervisord(haltd_flag="--no-exit-on-halt", exit_on_halt_in_config=True)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)  # stands in for the bus's JSON PUB
    pull = ctx.socket(zmq.PULL)  # stands in for the bus's bus.in
    try:
        for sock in (pub, pull):
            sock.setsockopt(zmq.LINGER, 0)
        pub.bind(s.cfg.ipc("bus.json"))
        pull.bind(s.cfg.ipc("bus.in"))
        s.wait_running()
        ev = schema.PotentialHaltTriggerEvent(
            timestamp=schema.ns_to_rfc3339(time.time_ns()), source_module="bookd",
            error_code="RESYNC_LIMIT", reason="5 resyncs of BTC/USD in 300 s",
            details="test", pair="BTC/USD")
        t_trigger = time.time_ns()
        seq = 0

        def publish_until_halted() -> bool:
            nonlocal seq
            if s.halt_path.exists():
                return True
            seq += 1
            env = schema.make_envelope(ev, epoch=1, seq=seq, pub_ns=time.time_ns())
            pub.send(schema.frame("trigger", schema.encode_envelope_json(env)))
            return False

        s.wait_for(publish_until_halted, 10, "halt.json after a bus trigger")
        # the HaltDecision was pushed to bus.in as an EVENT on topic halt
        assert pull.poll(5000), s.diagnostics()
        msg = pull.recv()
        assert unpack_header(msg)[0] == 3  # EVENT
        topic, type_name, body = split_event(msg)
        assert (topic, type_name) == ("halt", "HaltDecision")
        decision = msgspec.json.decode(body, type=schema.HaltDecision)
        assert decision.triggers[0].source == "bookd"
        assert decision.triggers[0].pair == "BTC/USD"
        s.wait_for(lambda: read_halt_record(s.halt_path).completed, 15, "stops done")
        infos = s.infos()
        assert [infos[n]["statename"] for n in STOP_ORDER] == ["STOPPED"] * 3
        assert infos["haltd"]["statename"] == "RUNNING"
        assert s.sv.getState()["statename"] == "RUNNING"  # no shutdown: inspectable
        assert s.proc.poll() is None
        rec = read_halt_record(s.halt_path)
        assert rec.decision == decision and not rec.exit_on_halt
        term, exit_ = assert_ordered_stop(s)
        # another trigger is recorded as late, nothing is stopped twice
        late = len(rec.late_triggers)
        env = schema.make_envelope(ev, epoch=1, seq=seq + 1, pub_ns=time.time_ns())
        pub.send(schema.frame("trigger", schema.encode_envelope_json(env)))
        s.wait_for(lambda: len(read_halt_record(s.halt_path).late_triggers) > late, 5,
                   "late trigger")
        assert len(read_halt_record(s.halt_path).stop_results) == 3
        assert [n for n, w, *_ in s.events() if w == "sigterm"] == STOP_ORDER
        print(f"\nbus trigger: first publish -> all stopped {(exit_['bus'] - t_trigger) / 1e6:.0f} ms")
    finally:
        pub.close()
        pull.close()
        ctx.term()
