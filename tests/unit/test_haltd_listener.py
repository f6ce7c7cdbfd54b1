"""haltd's listener core, superlance style: a stream of supervisord events in, protocol
tokens out, with a fake RPC (stop order, shutdown) and a fake bus sink. No supervisord."""

from __future__ import annotations

import http.client
import io
import json
import os
import subprocess
import sys
import xmlrpc.client
from pathlib import Path
from typing import Any

import msgspec
import pytest
from supervisor.xmlrpc import Faults

from bus import schema, supervisor_rpc
from bus.halt_policy import HaltPolicy, parse_remote_data
from bus.haltd import (
    HALT_FILE,
    READY,
    RESULT_OK,
    EventParser,
    Haltd,
    build_parser,
    effective_exit_on_halt,
    read_halt_record,
    to_input,
)
from bus.schema import HaltDecision, PotentialHaltTriggerEvent

REPO = Path(__file__).resolve().parents[2]
T0 = 1_760_000_000 * 10**9


class FakeSupervisor:
    """Records calls; checks halt.json exists (and is not yet completed) at every stop."""

    def __init__(self, halt_path: Path, faults: dict[str, int] | None = None) -> None:
        self.halt_path = halt_path
        self.calls: list[tuple[str, ...]] = []
        self.file_at_stop: list[dict[str, Any]] = []
        self.faults = faults or {}
        self.states = {"ingest": "RUNNING", "bookd": "RUNNING", "bus": "RUNNING"}

    def stopProcess(self, name: str, wait: bool = True) -> bool:  # noqa: N802 (RPC name)
        assert wait is True
        assert self.halt_path.exists(), f"stopProcess({name}) before halt.json was written"
        self.file_at_stop.append(json.loads(self.halt_path.read_text()))
        self.calls.append(("stopProcess", name))
        if name in self.faults:  # one-shot fault
            code = self.faults.pop(name)
            if code == Faults.NOT_RUNNING:
                self.states[name] = "FATAL"
            raise xmlrpc.client.Fault(code, f"{code}: {name}")
        self.states[name] = "STOPPED"
        return True

    def getAllProcessInfo(self) -> list[dict[str, Any]]:  # noqa: N802
        self.calls.append(("getAllProcessInfo",))
        return [{"name": n, "statename": s} for n, s in self.states.items()]

    def shutdown(self) -> bool:
        self.calls.append(("shutdown",))
        return True


class FakeRpc:
    def __init__(self, sup: FakeSupervisor) -> None:
        self.supervisor = sup


class FakeSink:
    def __init__(self, halt_path: Path) -> None:
        self.halt_path = halt_path
        self.published: list[HaltDecision] = []
        self.file_existed: list[bool] = []

    def publish(self, decision: HaltDecision) -> bool:
        self.file_existed.append(self.halt_path.exists())
        self.published.append(decision)
        return True


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> int:
        self.t += 1_000_000  # 1 ms per reading
        return self.t


def make(tmp_path: Path, *, exit_on_halt: bool = True, count: int = 3,
         faults: dict[str, int] | None = None) -> tuple[Haltd, FakeSupervisor, FakeSink, io.BytesIO]:
    halt_path = tmp_path / HALT_FILE
    sup = FakeSupervisor(halt_path, faults)
    sink = FakeSink(halt_path)
    out = io.BytesIO()
    core = Haltd(run_path=tmp_path, policy=HaltPolicy(crash_loop_count=count,
                                                      crash_loop_window_ns=60 * 10**9),
                 rpc=FakeRpc(sup), bus_sink=sink, out=out, exit_on_halt=exit_on_halt,
                 namespace="t_haltd", clock=Clock())
    return core, sup, sink, out


_serial = iter(range(1, 10**6))


def event(eventname: str, payload: str) -> bytes:
    body = payload.encode()
    n = next(_serial)
    return (f"ver:3.0 server:supervisor serial:{n} pool:haltd poolserial:{n} "
            f"eventname:{eventname} len:{len(body)}\n").encode() + body


def exited(name: str, expected: int = 0, pid: int = 100) -> bytes:
    # PROCESS_STATE payloads have no trailing newline
    return event("PROCESS_STATE_EXITED", f"processname:{name} groupname:{name} "
                                         f"from_state:RUNNING expected:{expected} pid:{pid}")


def fatal(name: str) -> bytes:
    return event("PROCESS_STATE_FATAL",
                 f"processname:{name} groupname:{name} from_state:BACKOFF")


def remote(type_: str, data: str) -> bytes:
    return event("REMOTE_COMMUNICATION", f"type:{type_}\n{data}")


def run_stream(core: Haltd, *chunks: bytes) -> int:
    """Feed the events through a real pipe into the poll loop; EOF ends it."""
    r, w = os.pipe()
    try:
        os.write(w, b"".join(chunks))
        os.close(w)
        return core.run(r, poll_ms=2000)
    finally:
        os.close(r)


def replies(n: int) -> bytes:
    return READY + (RESULT_OK + READY) * n


STOPS = [("stopProcess", "ingest"), ("stopProcess", "bookd"), ("stopProcess", "bus")]


def test_remote_halt_full_sequence(tmp_path: Path) -> None:
    core, sup, sink, out = make(tmp_path)
    rc = run_stream(core, exited("replay", 0), remote("halt", "test reason"),
                    exited("bookd", 0, pid=77))
    assert rc == 0
    assert out.getvalue() == replies(3)
    assert sup.calls == [*STOPS, ("getAllProcessInfo",), ("shutdown",)]
    # halt.json existed before the first stop, and the bus got the decision before too
    assert [f["completed"] for f in sup.file_at_stop] == [False, False, False]
    assert sup.file_at_stop[0]["decision"]["reason"].endswith("test reason")
    assert sink.file_existed == [True]
    [decision] = sink.published
    assert decision.stopped == ["ingest", "bookd", "bus"]
    assert decision.triggers[0].error_code == "REMOTE_HALT"
    rec = read_halt_record(tmp_path / HALT_FILE)
    assert rec.format == "krakenfeed-halt" and rec.version == 1
    assert rec.decision == decision
    assert rec.completed and rec.exit_on_halt and rec.namespace == "t_haltd"
    assert [(r.program, r.outcome) for r in rec.stop_results] == [
        ("ingest", "stopped"), ("bookd", "stopped"), ("bus", "stopped")]
    # evidence: the remote event; history: the replay exit that did not halt
    assert [type(e).__name__ for e in rec.evidence] == ["RemoteComm"]
    assert [e.program for e in rec.history] == ["replay"]
    # the crash after the halt is a late trigger, not a second halt
    assert [(t.source, t.error_code) for t in rec.late_triggers] == [("bookd", "UNEXPECTED_EXIT")]
    assert "pid 77" in rec.late_triggers[0].reason
    raw = json.loads((tmp_path / HALT_FILE).read_text())
    assert raw["evidence"][0]["input"] == "remote"
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no tmp file


def test_no_shutdown_without_exit_on_halt(tmp_path: Path) -> None:
    core, sup, sink, out = make(tmp_path, exit_on_halt=False)
    run_stream(core, fatal("bus"))
    assert sup.calls == [*STOPS, ("getAllProcessInfo",)]
    rec = read_halt_record(tmp_path / HALT_FILE)
    assert not rec.exit_on_halt and rec.completed
    assert "bus is FATAL" in rec.decision.reason


def test_one_kill_of_each_does_not_halt_but_a_crash_loop_does(tmp_path: Path) -> None:
    core, sup, sink, out = make(tmp_path, count=3)
    run_stream(core, exited("ingest"), exited("bookd"), exited("bus"))
    assert out.getvalue() == replies(3)
    assert sup.calls == [] and sink.published == []
    assert not (tmp_path / HALT_FILE).exists()

    out.seek(0)
    out.truncate()
    run_stream(core, exited("bookd", pid=2), exited("bookd", pid=3))
    assert out.getvalue() == replies(2)
    assert sup.calls[:3] == STOPS
    rec = read_halt_record(tmp_path / HALT_FILE)
    assert "crash loop: bookd exited unexpectedly 3 times" in rec.decision.reason
    assert len(rec.decision.triggers) == 3


def test_fatal_of_replay_and_events_about_haltd_do_not_halt(tmp_path: Path) -> None:
    core, sup, sink, out = make(tmp_path, count=2)
    run_stream(core, fatal("replay"), exited("haltd", 1), exited("haltd", 0),
               exited("haltd", 0), fatal("haltd"),
               event("PROCESS_STATE_STOPPED", "processname:bus groupname:bus "
                                              "from_state:STOPPING pid:5"),
               event("TICK_5", "when:1760000000"), remote("note", "halt"))
    assert out.getvalue() == replies(8)
    assert sup.calls == [] and not (tmp_path / HALT_FILE).exists()
    assert core.counters["events"] == 8


def test_expected_exit_of_core_program_halts(tmp_path: Path) -> None:
    core, sup, sink, out = make(tmp_path)
    run_stream(core, exited("ingest", expected=1))
    rec = read_halt_record(tmp_path / HALT_FILE)
    assert rec.decision.triggers[0].error_code == "EXPECTED_EXIT"
    assert sup.calls[:3] == STOPS


def test_stop_faults_are_tolerated_and_later_programs_still_stopped(tmp_path: Path) -> None:
    core, sup, sink, out = make(tmp_path, faults={"ingest": Faults.NOT_RUNNING,
                                                  "bookd": Faults.FAILED})
    run_stream(core, remote("halt", "x"))
    assert sup.calls[:3] == STOPS
    rec = read_halt_record(tmp_path / HALT_FILE)
    assert [(r.program, r.outcome) for r in rec.stop_results] == [
        ("ingest", "NOT_RUNNING"), ("bookd", "error"), ("bus", "stopped"),
        ("bookd", "stopped")]  # still RUNNING after the pass: stopped again
    assert "fault 30" in rec.stop_results[1].detail


def test_byte_by_byte_reads_give_the_same_protocol(tmp_path: Path) -> None:
    core, sup, sink, out = make(tmp_path, count=2)
    stream = exited("replay") + remote("halt", "multi\nline reason") + fatal("bus")
    for i in range(len(stream)):
        core.on_stdin_data(stream[i:i + 1])
    assert out.getvalue() == replies(3)[len(READY):]  # run() writes the first READY
    rec = read_halt_record(tmp_path / HALT_FILE)
    assert rec.decision.triggers[0].reason == "multi\nline reason"
    assert [t.error_code for t in rec.late_triggers] == ["PROCESS_FATAL"]


def test_previous_halt_is_adopted_and_nothing_is_stopped(tmp_path: Path) -> None:
    core, sup, sink, out = make(tmp_path)
    run_stream(core, remote("halt", "first incident"))
    first = read_halt_record(tmp_path / HALT_FILE)

    core2, sup2, sink2, out2 = make(tmp_path)  # haltd restarted, halt.json not cleared
    assert core2.check_previous_halt()
    run_stream(core2, remote("halt", "second"), fatal("bookd"))
    assert out2.getvalue() == replies(2)
    assert sup2.calls == [] and sink2.published == []
    rec = read_halt_record(tmp_path / HALT_FILE)
    assert rec.decision == first.decision
    assert [t.reason for t in rec.late_triggers][0] == "second"
    assert [t.error_code for t in rec.late_triggers] == ["REMOTE_HALT", "PROCESS_FATAL"]


def test_unreadable_previous_halt_file_latches_without_touching_it(tmp_path: Path) -> None:
    (tmp_path / HALT_FILE).write_text("not json")
    core, sup, sink, out = make(tmp_path)
    assert core.check_previous_halt()
    run_stream(core, remote("halt", "again"))
    assert sup.calls == [] and (tmp_path / HALT_FILE).read_text() == "not json"
    assert core.policy.late_triggers[0].reason == "again"


def test_no_previous_halt(tmp_path: Path) -> None:
    core, *_ = make(tmp_path)
    assert not core.check_previous_halt()
    assert not core.policy.latched


def _trigger_frame(seq: int, epoch: int = 5, pair: str | None = "BTC/USD") -> bytes:
    ev = PotentialHaltTriggerEvent(timestamp="2026-01-01T00:00:00.000000000Z",
                                   source_module="bookd", error_code="RESYNC_LIMIT",
                                   reason="5 resyncs in 300 s", details="", pair=pair)
    env = schema.make_envelope(ev, epoch=epoch, seq=seq, pub_ns=T0)
    return schema.frame("trigger", schema.encode_envelope_json(env))


def test_bus_trigger_halts_and_bad_messages_are_counted(tmp_path: Path) -> None:
    core, sup, sink, out = make(tmp_path)
    assert core.on_bus_message(b"trigger {not json") is None
    assert core.on_bus_message(b"no-space-here") is None
    sys_ev = schema.SystemStateEvent(timestamp="2026-01-01T00:00:00Z", service_name="bus",
                                     status_code="CONNECTED", status_message="")
    wrong = schema.frame("system", schema.encode_envelope_json(
        schema.make_envelope(sys_ev, epoch=1, seq=1, pub_ns=T0)))
    assert core.on_bus_message(wrong) is None
    assert core.counters["bad_bus_messages"] == 3 and sup.calls == []

    d = core.on_bus_message(_trigger_frame(1))
    assert d is not None and "bookd raised RESYNC_LIMIT for BTC/USD" in d.reason
    assert sup.calls == [*STOPS, ("getAllProcessInfo",), ("shutdown",)]
    assert sink.published == [d] and sink.file_existed == [True]
    assert core.on_bus_message(_trigger_frame(4)) is None  # seq 2, 3 lost
    assert core.counters["trigger_gaps"] == 1
    rec = read_halt_record(tmp_path / HALT_FILE)
    assert len(rec.late_triggers) == 1
    assert out.getvalue() == b""  # bus input writes no protocol tokens


def test_event_parser_headers_and_bad_header(tmp_path: Path) -> None:
    p = EventParser()
    evs = p.feed(b"garbage without len\n" + exited("bus", 1, pid=9)[:20])
    assert evs == [] and p.errors == 1
    evs = p.feed(exited("bus", 1, pid=9)[20:])
    [(headers, payload)] = evs
    assert headers["eventname"] == "PROCESS_STATE_EXITED" and headers["pool"] == "haltd"
    inp = to_input(headers, payload, T0)
    assert msgspec.structs.asdict(inp) == {
        "kind": "EXITED", "program": "bus", "at_ns": T0, "expected": True, "group": "bus",
        "from_state": "RUNNING", "pid": 9}


def test_invalid_config_exits_78(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[trading]\npairs = ["BTC/USD"]\n[haltd]\ncrash_loop_count = 1\n')
    proc = subprocess.run([sys.executable, "-m", "bus.haltd", "--config", str(cfg)],
                          cwd=REPO, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 78
    assert "haltd.crash_loop_count" in proc.stderr
    assert proc.stdout == ""  # stdout is the protocol channel


@pytest.mark.parametrize("argv,configured,expected", [
    ([], False, False), ([], True, True),
    (["--exit-on-halt"], False, True), (["--no-exit-on-halt"], True, False),
])
def test_exit_on_halt_flag_wins(argv: list[str], configured: bool, expected: bool) -> None:
    args = build_parser().parse_args(["--config", "x.toml", *argv])
    assert effective_exit_on_halt(args.exit_on_halt, configured) is expected


def test_without_rpc_the_decision_is_recorded_but_not_completed(tmp_path: Path) -> None:
    core, sup, sink, out = make(tmp_path)
    core.rpc = None  # haltd started outside supervisord
    run_stream(core, remote("halt", "no supervisord"))
    assert out.getvalue() == replies(1)
    rec = read_halt_record(tmp_path / HALT_FILE)
    assert rec.decision.triggers[0].reason == "no supervisord"
    assert not rec.completed and rec.stop_results == []
    assert len(sink.published) == 1


def test_signal_via_wakeup_fd_ends_the_loop_promptly(tmp_path: Path) -> None:
    core, sup, sink, out = make(tmp_path)
    r, w = os.pipe()  # stdin: stays open, no EOF
    wr, ww = os.pipe()
    try:
        os.write(ww, bytes([15]))  # what signal.set_wakeup_fd writes for SIGTERM
        assert core.run(r, wake_fd=wr, poll_ms=5000) == 0
        assert core.terminate == "SIGTERM"
        assert out.getvalue() == READY
    finally:
        for fd in (r, w, wr, ww):
            os.close(fd)


def test_signal_during_the_halt_lets_the_ordered_stops_finish(tmp_path: Path) -> None:
    core, sup, sink, out = make(tmp_path)
    stop = sup.stopProcess

    def stop_and_signal(name: str, wait: bool = True) -> bool:
        core.terminate = "SIGTERM"  # the handler fired while the first stop waited
        return stop(name, wait)

    sup.stopProcess = stop_and_signal  # type: ignore[method-assign]
    r, w = os.pipe()
    try:
        os.write(w, remote("halt", "x") + remote("halt", "never read"))
        assert core.run(r, poll_ms=5000) == 0  # returns without EOF
    finally:
        os.close(r)
        os.close(w)
    assert sup.calls[:3] == STOPS and ("shutdown",) in sup.calls
    assert read_halt_record(tmp_path / HALT_FILE).completed
    # both events arrived in one read: both were answered, the second is a late trigger
    assert out.getvalue() == replies(2)


def test_an_internal_error_is_logged_and_the_event_still_answered(tmp_path: Path) -> None:
    core, sup, sink, out = make(tmp_path)

    def broken(inp: Any) -> None:
        raise RuntimeError("bug")

    core.policy.feed = broken  # type: ignore[method-assign]
    run_stream(core, remote("halt", "x"), fatal("bus"))
    assert out.getvalue() == replies(2)  # still speaking the protocol
    assert core.counters["errors"] == 2 and sup.calls == []


# --- bus/supervisor_rpc.py helpers ----------------------------------------------------------
class FlakyRpc:
    """Each `.supervisor` access is a new proxy (like SupervisorRpc); the first N fail."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.proxies = 0
        self.sent: list[tuple[str, ...]] = []

    @property
    def supervisor(self) -> Any:
        self.proxies += 1
        rpc = self

        class Proxy:
            def sendRemoteCommEvent(self, type_: str, data: str) -> bool:  # noqa: N802
                if rpc.failures:
                    rpc.failures -= 1
                    raise http.client.CannotSendRequest("Request-sent")
                rpc.sent.append((type_, data))
                return True

            def shutdown(self) -> bool:
                raise xmlrpc.client.Fault(Faults.SHUTDOWN_STATE, "SHUTDOWN_STATE")

        return Proxy()


def test_call_retries_transport_errors_with_a_fresh_proxy() -> None:
    rpc = FlakyRpc(failures=2)
    assert supervisor_rpc.call(rpc, "sendRemoteCommEvent", "halt", "x", delay_s=0) is True
    assert rpc.proxies == 3 and rpc.sent == [("halt", "x")]
    rpc = FlakyRpc(failures=5)
    with pytest.raises(http.client.CannotSendRequest):
        supervisor_rpc.call(rpc, "sendRemoteCommEvent", "halt", "x", attempts=2, delay_s=0)
    assert rpc.proxies == 2


def test_send_halt_remote_encodes_what_the_policy_parses() -> None:
    rpc = FlakyRpc(failures=0)
    assert supervisor_rpc.send_halt_remote("book crossed", source="bookd",
                                           error_code="BOOK_CROSSED", pair="BTC/USD", rpc=rpc)
    [(type_, data)] = rpc.sent
    assert type_ == "halt"
    assert parse_remote_data(data) == ("book crossed", "bookd", "BOOK_CROSSED", "BTC/USD")
    # unreachable supervisord: False, never an exception
    assert not supervisor_rpc.send_halt_remote("x", rpc=FlakyRpc(failures=10))


def test_rpc_handles_and_shutdown_tolerance(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KeyError):
        supervisor_rpc.rpc_from_env({})
    monkeypatch.delenv("SUPERVISOR_SERVER_URL", raising=False)
    assert not supervisor_rpc.send_halt_remote("no supervisord here")
    rpc = supervisor_rpc.rpc_from_env({"SUPERVISOR_SERVER_URL": "unix:///tmp/x.sock"})
    assert rpc.serverurl == "unix:///tmp/x.sock"
    assert rpc.proxy() is not rpc.proxy()  # no shared connection state
    assert supervisor_rpc.rpc_for_socket("/tmp/y.sock").serverurl == "unix:///tmp/y.sock"
    with pytest.raises(ValueError):
        supervisor_rpc.SupervisorRpc("tcp://nope")
    assert supervisor_rpc.shutdown(FlakyRpc(0))  # SHUTDOWN_STATE: already shutting down
