"""bus/halt_policy.py: each halt rule, the crash-loop window, latching, late triggers."""

from __future__ import annotations

import ast
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus.halt_policy import (
    CORE_PROGRAMS,
    CRASH,
    FATAL,
    LEFT,
    REMOTE,
    HaltPolicy,
    PolicyInput,
    ProcessEvent,
    RemoteComm,
    SupervisorState,
    TriggerInput,
    parse_remote_data,
)
from bus.schema import HaltDecision, PotentialHaltTriggerEvent, ns_to_rfc3339

S = 1_000_000_000
T0 = 1_760_000_000 * S  # some unix time
WINDOW = 60 * S


def policy(count: int = 3, window: int = WINDOW) -> HaltPolicy:
    return HaltPolicy(crash_loop_count=count, crash_loop_window_ns=window)


def crash(program: str, at: int, pid: int = 4242) -> ProcessEvent:
    return ProcessEvent(kind="EXITED", program=program, group=program, expected=False,
                        from_state="RUNNING", pid=pid, at_ns=at)


def trigger(at: int = T0, pair: str | None = "BTC/USD") -> TriggerInput:
    ev = PotentialHaltTriggerEvent(timestamp=ns_to_rfc3339(at - S), source_module="bookd",
                                   error_code="CHECKSUM_MISMATCHES",
                                   reason="5 checksum mismatches in 300 s",
                                   details="last expected 123 got 456", pair=pair)
    return TriggerInput(event=ev, at_ns=at)


def test_pure_module_imports() -> None:
    src = Path(__file__).resolve().parents[2] / "bus" / "halt_policy.py"
    tree = ast.parse(src.read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & {"asyncio", "zmq", "picows", "socket", "time", "multiprocessing",
                        "os", "supervisor"}


def test_trigger_event_halts_with_its_fields() -> None:
    p = policy()
    d = p.feed(trigger())
    assert isinstance(d, HaltDecision)
    assert d.stopped == ["ingest", "bookd", "bus"]
    assert d.timestamp == ns_to_rfc3339(T0)
    [t] = d.triggers
    assert (t.source, t.error_code, t.pair) == ("bookd", "CHECKSUM_MISMATCHES", "BTC/USD")
    assert t.reason == "5 checksum mismatches in 300 s"
    assert t.at == ns_to_rfc3339(T0 - S)  # the source's own time
    assert "bookd raised CHECKSUM_MISMATCHES for BTC/USD" in d.reason
    assert p.evidence == [trigger()]
    assert p.latched


def test_trigger_from_any_process_halts() -> None:
    ev = PotentialHaltTriggerEvent(timestamp=ns_to_rfc3339(T0), source_module="my_strategy",
                                   error_code="X", reason="r", details="")
    d = policy().feed(TriggerInput(event=ev, at_ns=T0))
    assert d is not None and d.triggers[0].source == "my_strategy"
    assert d.triggers[0].pair is None


@pytest.mark.parametrize("program", CORE_PROGRAMS)
def test_fatal_of_core_program_halts(program: str) -> None:
    d = policy().feed(ProcessEvent(kind="FATAL", program=program, from_state="BACKOFF",
                                   at_ns=T0))
    assert d is not None
    assert d.triggers[0].source == program and d.triggers[0].error_code == FATAL
    assert program in d.reason and "FATAL" in d.reason


def test_fatal_of_replay_or_haltd_does_not_halt() -> None:
    p = policy()
    for name in ("replay", "haltd", "something_else"):
        assert p.feed(ProcessEvent(kind="FATAL", program=name, from_state="BACKOFF",
                                   at_ns=T0)) is None
        assert name in p.last_note and "not a core program" in p.last_note
    assert not p.latched
    assert [e.program for e in p.history] == ["replay", "haltd", "something_else"]


def test_replay_crash_loop_does_not_halt() -> None:
    p = policy()
    assert all(p.feed(crash("replay", T0 + i * S)) is None for i in range(10))
    assert not p.latched


def test_one_kill_of_each_program_does_not_halt() -> None:
    p = policy(count=2)  # even the smallest crash-loop count
    for i, name in enumerate(CORE_PROGRAMS):
        assert p.feed(crash(name, T0 + i * S)) is None
        assert "crash 1 of 2" in p.last_note
    assert not p.latched and p.counters["crashes"] == 3


def test_n_crashes_of_one_program_within_window_halt() -> None:
    p = policy(count=3)
    assert p.feed(crash("bookd", T0, pid=1)) is None
    assert p.feed(crash("ingest", T0 + S, pid=9)) is None  # counted separately
    assert p.feed(crash("bookd", T0 + 2 * S, pid=2)) is None
    d = p.feed(crash("bookd", T0 + 3 * S, pid=3))
    assert d is not None
    assert "crash loop" in d.reason and "bookd" in d.reason and "3 times" in d.reason
    assert [t.error_code for t in d.triggers] == [CRASH] * 3
    assert [t.at for t in d.triggers] == [ns_to_rfc3339(T0 + k * S) for k in (0, 2, 3)]
    assert "pid 1" in d.triggers[0].reason and "pid 3" in d.triggers[2].reason
    assert [e.pid for e in p.evidence] == [1, 2, 3]


def test_crashes_spread_beyond_the_window_do_not_halt() -> None:
    p = policy(count=3, window=WINDOW)
    # one crash every 31 s: at most 2 in any 60 s window
    for i in range(20):
        assert p.feed(crash("bus", T0 + i * 31 * S)) is None
    assert not p.latched
    # a crash exactly one window after the oldest one does not count it
    p = policy(count=2, window=WINDOW)
    assert p.feed(crash("bus", T0)) is None
    assert p.feed(crash("bus", T0 + WINDOW)) is None
    assert p.feed(crash("bus", T0 + WINDOW + S)) is not None


@given(st.lists(st.integers(min_value=0, max_value=10_000), min_size=1, max_size=40),
       st.integers(min_value=2, max_value=5))
@settings(max_examples=200, deadline=None)
def test_crash_loop_halts_exactly_when_a_window_holds_n_crashes(
        gaps: list[int], count: int) -> None:
    window = 1000
    times = []
    t = T0
    for g in gaps:
        t += g
        times.append(t)
    p = HaltPolicy(crash_loop_count=count, crash_loop_window_ns=window)
    decided_at = None
    for i, at in enumerate(times):
        if p.feed(crash("bookd", at)) is not None:
            decided_at = i
            break
    # reference: first index whose last `count` crashes span less than the window
    expected = next((i for i in range(count - 1, len(times))
                     if times[i] - times[i - count + 1] < window), None)
    assert decided_at == expected


def test_expected_exit_of_core_program_halts() -> None:
    p = policy()
    d = p.feed(ProcessEvent(kind="EXITED", program="bus", expected=True, pid=7, at_ns=T0))
    assert d is not None and d.triggers[0].error_code == LEFT
    assert "exited on its own" in d.reason


def test_expected_exit_while_supervisord_stops_does_not_halt() -> None:
    p = policy()
    assert p.feed(SupervisorState(state="STOPPING", at_ns=T0)) is None
    assert p.feed(ProcessEvent(kind="EXITED", program="bus", expected=True, at_ns=T0)) is None
    assert not p.latched
    assert p.feed(SupervisorState(state="RUNNING", at_ns=T0 + S)) is None
    assert p.feed(ProcessEvent(kind="EXITED", program="bus", expected=True,
                               at_ns=T0 + 2 * S)) is not None


@pytest.mark.parametrize("kind", ["STOPPED", "STOPPING", "STARTING", "RUNNING", "BACKOFF",
                                  "UNKNOWN"])
def test_administrative_and_other_states_never_halt(kind: str) -> None:
    p = policy(count=2)
    for i in range(5):
        for name in CORE_PROGRAMS:
            assert p.feed(ProcessEvent(kind=kind, program=name, at_ns=T0 + i)) is None
    assert not p.latched and p.counters["ignored"] == 15


def test_remote_halt_plain_text() -> None:
    d = policy().feed(RemoteComm(type="halt", data="test reason", at_ns=T0))
    assert d is not None
    [t] = d.triggers
    assert (t.source, t.error_code, t.reason, t.pair) == ("remote", REMOTE, "test reason", None)
    assert "test reason" in d.reason


def test_remote_halt_json_data() -> None:
    data = '{"reason":"book crossed","source":"bus","error_code":"BOOK_CROSSED","pair":"ETH/USD"}'
    d = policy().feed(RemoteComm(type="halt", data=data, at_ns=T0))
    assert d is not None
    t = d.triggers[0]
    assert (t.source, t.error_code, t.reason, t.pair) == (
        "bus", "BOOK_CROSSED", "book crossed", "ETH/USD")


def test_remote_of_other_type_is_ignored() -> None:
    p = policy()
    assert p.feed(RemoteComm(type="hello", data="halt", at_ns=T0)) is None
    assert not p.latched and "ignored" in p.last_note


def test_parse_remote_data() -> None:
    assert parse_remote_data("  ") == ("(no reason given)", None, None, None)
    assert parse_remote_data("{not json") == ("{not json", None, None, None)
    assert parse_remote_data('{"reason": "r"}') == ("r", None, None, None)


def test_latched_exactly_one_decision_and_late_triggers_recorded() -> None:
    p = policy(count=2)
    first = p.feed(RemoteComm(type="halt", data="first", at_ns=T0))
    assert first is not None
    later: list[PolicyInput] = [
        trigger(T0 + S),
        ProcessEvent(kind="FATAL", program="bookd", at_ns=T0 + 2 * S),
        crash("ingest", T0 + 3 * S),
        crash("ingest", T0 + 4 * S),
        RemoteComm(type="halt", data="second", at_ns=T0 + 5 * S),
        ProcessEvent(kind="STOPPED", program="bus", at_ns=T0 + 6 * S),  # not a trigger
        ProcessEvent(kind="FATAL", program="replay", at_ns=T0 + 7 * S),  # not core
    ]
    assert [p.feed(x) for x in later] == [None] * len(later)
    assert p.decision is first
    assert [(t.source, t.error_code) for t in p.late_triggers] == [
        ("bookd", "CHECKSUM_MISMATCHES"), ("bookd", FATAL), ("ingest", CRASH),
        ("ingest", CRASH), ("remote", REMOTE)]
    assert p.late_triggers[-1].reason == "second"
    assert p.counters["late"] == 5
    assert "not a core program" in p.last_note


@given(st.lists(st.one_of(
    st.builds(lambda k, n, e, dt: ProcessEvent(kind=k, program=n, expected=e, at_ns=T0 + dt),
              st.sampled_from(["EXITED", "FATAL", "STOPPED", "RUNNING"]),
              st.sampled_from(["ingest", "bookd", "bus", "replay", "haltd"]),
              st.booleans(), st.integers(0, 10**12)),
    st.builds(lambda t, dt: RemoteComm(type=t, data="x", at_ns=T0 + dt),
              st.sampled_from(["halt", "other"]), st.integers(0, 10**12)),
    st.builds(lambda dt: trigger(T0 + dt), st.integers(0, 10**12)),
), max_size=30))
@settings(max_examples=200, deadline=None)
def test_never_more_than_one_decision(inputs: list[PolicyInput]) -> None:
    p = policy()
    decisions = [d for d in (p.feed(x) for x in inputs) if d is not None]
    assert len(decisions) <= 1
    if decisions:
        assert p.decision is decisions[0]
        assert decisions[0].stopped == ["ingest", "bookd", "bus"]


def test_inputs_and_decision_encode_to_json() -> None:
    p = policy()
    d = p.feed(trigger())
    enc = msgspec.json.encode({"decision": d, "evidence": p.evidence})
    back = msgspec.json.decode(enc, type=dict[str, HaltDecision | list[PolicyInput]])
    assert back["decision"] == d
    assert back["evidence"] == p.evidence
    assert b'"input":"trigger"' in enc


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError, match="crash_loop_count"):
        HaltPolicy(crash_loop_count=1)
    with pytest.raises(ValueError, match="crash_loop_window_ns"):
        HaltPolicy(crash_loop_window_ns=0)


def test_custom_core_programs_and_stop_order() -> None:
    p = HaltPolicy(core_programs=("bus", "ingest"), stop_order=("ingest", "bookd", "bus"))
    assert p.stop_order == ["ingest", "bus"]
    assert p.feed(ProcessEvent(kind="FATAL", program="bookd", at_ns=T0)) is None
    d = p.feed(ProcessEvent(kind="FATAL", program="bus", at_ns=T0))
    assert d is not None and d.stopped == ["ingest", "bus"]
