"""The halt policy: inputs in, one latched `HaltDecision` out (pure; no clock, no I/O).

haltd (`bus/haltd.py`) turns what it sees into the values below and feeds them here:

* `TriggerInput`: a `PotentialHaltTriggerEvent` read from the bus topic `trigger`;
* `ProcessEvent`: a supervisord `PROCESS_STATE_*` event (`EXITED`, `FATAL`, ...);
* `RemoteComm`: a supervisord `REMOTE_COMMUNICATION` event (the fallback path when the
  bus itself is down: any process calls `supervisor.sendRemoteCommEvent("halt", ...)`);
* `SupervisorState`: supervisord itself is `RUNNING` or `STOPPING` (optional input; a
  core program that exits while supervisord shuts down is not "left on its own").

Rules (SUPERVISORD.md B.7). A halt is warranted by

1. any `PotentialHaltTriggerEvent`, from any process;
2. `FATAL` of a core program (supervisord gave up starting it);
3. a crash loop: `crash_loop_count` unexpected exits (`EXITED` with `expected=False`)
   of ONE core program within `crash_loop_window_ns`, counted per program, so one kill
   of each program never halts;
4. `EXITED` with `expected=True` of a core program while the system should run: with
   `autorestart=unexpected` supervisord does not restart it, so a component silently
   left the system;
5. a `REMOTE_COMMUNICATION` event of type `halt`.

Everything else is recorded but never halts: administrative `STOPPED`/`STOPPING` (the
halt's own stops produce them), `BACKOFF`/`STARTING`/`RUNNING`, remote events of other
types, and any event about a program outside `core_programs` (haltd itself, and
`replay`, the test/demo feed: its `FATAL` is logged, the market data path is not
affected by it).

Latching: `feed()` returns the decision exactly once, the first time a halt is
warranted. Afterwards halt-relevant inputs are appended to `late_triggers` (as
`HaltTrigger` values) and `feed()` returns None. `last_note` always says, in words,
what the last input did, for haltd's log.

Remote data: the `data` of a remote `halt` is either plain text (the reason, verbatim)
or a JSON object `{"reason": ..., "source": ..., "error_code": ..., "pair": ...}` as
written by `bus.supervisor_rpc.send_halt_remote`.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

import msgspec

from bus.schema import HaltDecision, HaltTrigger, PotentialHaltTriggerEvent, ns_to_rfc3339

CORE_PROGRAMS = ("ingest", "bookd", "bus")
# The stop order of a halt: no new data first, then the books, then the bus last so it
# can carry the HaltDecision to consumers (DESIGN.md section 1).
STOP_ORDER = ("ingest", "bookd", "bus")
REMOTE_HALT_TYPE = "halt"
HISTORY_MAX = 100

# error_code values of triggers the policy makes itself (trigger events keep theirs).
FATAL = "PROCESS_FATAL"
CRASH = "UNEXPECTED_EXIT"
LEFT = "EXPECTED_EXIT"
REMOTE = "REMOTE_HALT"

ProcessKind = Literal["EXITED", "FATAL", "STOPPED", "STOPPING", "STARTING", "RUNNING",
                      "BACKOFF", "UNKNOWN"]


class TriggerInput(msgspec.Struct, frozen=True, kw_only=True, tag="trigger",
                   tag_field="input"):
    """A PotentialHaltTriggerEvent from the bus, received at at_ns (unix ns)."""

    event: PotentialHaltTriggerEvent
    at_ns: int


class ProcessEvent(msgspec.Struct, frozen=True, kw_only=True, tag="process",
                   tag_field="input"):
    """A supervisord PROCESS_STATE_<kind> event about one program."""

    kind: ProcessKind
    program: str  # processname
    at_ns: int
    expected: bool = False  # EXITED only: the exit code was in `exitcodes`
    group: str = ""
    from_state: str = ""
    pid: int = 0


class RemoteComm(msgspec.Struct, frozen=True, kw_only=True, tag="remote",
                 tag_field="input"):
    """A supervisord REMOTE_COMMUNICATION event (sendRemoteCommEvent(type, data))."""

    type: str
    data: str
    at_ns: int


class SupervisorState(msgspec.Struct, frozen=True, kw_only=True, tag="supervisor",
                      tag_field="input"):
    """supervisord's own state (SUPERVISOR_STATE_CHANGE_RUNNING / _STOPPING)."""

    state: Literal["RUNNING", "STOPPING"]
    at_ns: int


PolicyInput = TriggerInput | ProcessEvent | RemoteComm | SupervisorState


class _RemoteData(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    reason: str
    source: str | None = None
    error_code: str | None = None
    pair: str | None = None


_remote_decoder = msgspec.json.Decoder(_RemoteData)


def parse_remote_data(data: str) -> tuple[str, str | None, str | None, str | None]:
    """``(reason, source, error_code, pair)`` of a remote halt's data (JSON or text)."""
    text = data.strip()
    if text.startswith("{"):
        try:
            d = _remote_decoder.decode(text)
        except msgspec.DecodeError:
            pass
        else:
            return d.reason, d.source, d.error_code, d.pair
    return text or "(no reason given)", None, None, None


def _window_text(ns: int) -> str:
    return f"{ns / 1e9:g} s"


class HaltPolicy:
    """Turns inputs into one latched HaltDecision (see the module docstring)."""

    def __init__(self, core_programs: tuple[str, ...] = CORE_PROGRAMS,
                 crash_loop_count: int = 3, crash_loop_window_ns: int = 60 * 10**9,
                 stop_order: tuple[str, ...] = STOP_ORDER) -> None:
        if crash_loop_count < 2:
            raise ValueError("crash_loop_count must be >= 2 (one kill must not halt)")
        if crash_loop_window_ns <= 0:
            raise ValueError("crash_loop_window_ns must be > 0")
        self.core_programs = tuple(core_programs)
        self.crash_loop_count = crash_loop_count
        self.crash_loop_window_ns = int(crash_loop_window_ns)
        self.stop_order = [p for p in stop_order if p in self.core_programs] + [
            p for p in self.core_programs if p not in stop_order]
        self.decision: HaltDecision | None = None
        self.evidence: list[PolicyInput] = []  # the inputs that made the decision
        self.late_triggers: list[HaltTrigger] = []  # halt-worthy inputs after the latch
        self.history: deque[PolicyInput] = deque(maxlen=HISTORY_MAX)  # notable non-halts
        self.should_run = True
        self.last_note = ""
        self._crashes: dict[str, deque[ProcessEvent]] = {}
        self.counters = {"inputs": 0, "triggers": 0, "process_events": 0, "crashes": 0,
                         "ignored": 0, "late": 0}

    @property
    def latched(self) -> bool:
        return self.decision is not None

    def latch_external(self, decision: HaltDecision) -> None:
        """Adopt a decision made earlier (e.g. an uncleared run/halt.json): the policy
        then only records late triggers."""
        if self.decision is None:
            self.decision = decision

    # -- the one entry point ----------------------------------------------------------
    def feed(self, inp: PolicyInput) -> HaltDecision | None:
        """Record one input; return the HaltDecision the first time a halt is warranted."""
        self.counters["inputs"] += 1
        if isinstance(inp, TriggerInput):
            found = self._trigger(inp)
        elif isinstance(inp, ProcessEvent):
            found = self._process(inp)
        elif isinstance(inp, RemoteComm):
            found = self._remote(inp)
        elif isinstance(inp, SupervisorState):
            self.should_run = inp.state == "RUNNING"
            self.last_note = f"supervisord is {inp.state}"
            return None
        else:  # pragma: no cover - the type annotation rules it out
            raise TypeError(f"not a policy input: {type(inp).__name__}")
        if found is None:
            return None
        reason, triggers, evidence = found
        if self.decision is not None:
            self.late_triggers.extend(triggers)
            self.counters["late"] += 1
            self.last_note = f"already halted; late trigger recorded: {reason}"
            return None
        self.decision = HaltDecision(timestamp=ns_to_rfc3339(inp.at_ns), reason=reason,
                                     triggers=triggers, stopped=list(self.stop_order))
        self.evidence = evidence
        self.last_note = f"HALT: {reason}"
        return self.decision

    # -- rules --------------------------------------------------------------------------
    def _trigger(self, inp: TriggerInput) -> tuple[str, list[HaltTrigger], list[PolicyInput]]:
        self.counters["triggers"] += 1
        ev = inp.event
        trig = HaltTrigger(source=ev.source_module, error_code=ev.error_code, reason=ev.reason,
                           pair=ev.pair, at=ev.timestamp or ns_to_rfc3339(inp.at_ns))
        where = f" for {ev.pair}" if ev.pair else ""
        reason = f"{ev.source_module} raised {ev.error_code}{where}: {ev.reason}"
        return reason, [trig], [inp]

    def _remote(self, inp: RemoteComm) -> tuple[str, list[HaltTrigger], list[PolicyInput]] | None:
        if inp.type != REMOTE_HALT_TYPE:
            self.counters["ignored"] += 1
            self.last_note = f"remote communication of type {inp.type!r} ignored"
            return None
        text, source, code, pair = parse_remote_data(inp.data)
        src = source or "remote"
        trig = HaltTrigger(source=src, error_code=code or REMOTE, reason=text, pair=pair,
                           at=ns_to_rfc3339(inp.at_ns))
        reason = f"halt requested by {src} through supervisord: {text}"
        return reason, [trig], [inp]

    def _process(self, inp: ProcessEvent) -> tuple[str, list[HaltTrigger], list[PolicyInput]] | None:
        self.counters["process_events"] += 1
        name = inp.program
        at = ns_to_rfc3339(inp.at_ns)
        core = name in self.core_programs
        if inp.kind not in ("EXITED", "FATAL"):
            self.counters["ignored"] += 1
            self.last_note = f"{name} {inp.kind}: not a halt input"
            return None
        if not core:
            self.counters["ignored"] += 1
            self.history.append(inp)
            what = "exited" if inp.kind == "EXITED" else "is FATAL"
            self.last_note = (f"{name} {what} (expected={inp.expected}); not a core program "
                              f"({', '.join(self.core_programs)}), so no halt")
            return None
        if inp.kind == "FATAL":
            trig = HaltTrigger(source=name, error_code=FATAL, at=at,
                               reason=f"{name} entered FATAL from {inp.from_state or '?'}: "
                                      "supervisord gave up starting it")
            return (f"core program {name} is FATAL (supervisord will not retry it)",
                    [trig], [inp])
        if inp.expected:
            if not self.should_run:
                self.counters["ignored"] += 1
                self.history.append(inp)
                self.last_note = f"{name} exited (expected) while supervisord is stopping"
                return None
            trig = HaltTrigger(source=name, error_code=LEFT, at=at,
                               reason=f"{name} (pid {inp.pid}) exited with an expected code "
                                      "while the system should run; it is not restarted")
            return (f"core program {name} exited on its own while the system should run",
                    [trig], [inp])
        return self._crash(inp)

    def _crash(self, inp: ProcessEvent) -> tuple[str, list[HaltTrigger], list[PolicyInput]] | None:
        self.counters["crashes"] += 1
        name = inp.program
        window = self.crash_loop_window_ns
        crashes = self._crashes.setdefault(name, deque())
        crashes.append(inp)
        while crashes and crashes[0].at_ns <= inp.at_ns - window:
            crashes.popleft()
        n = len(crashes)
        recent = list(crashes)
        triggers = [HaltTrigger(source=name, error_code=CRASH, at=ns_to_rfc3339(c.at_ns),
                                reason=f"{name} (pid {c.pid}) exited unexpectedly, crash {i} "
                                       f"of {n} within {_window_text(window)}")
                    for i, c in enumerate(recent, 1)]
        if self.decision is not None:  # after the latch every crash is a late trigger
            return f"{name} exited unexpectedly (crash {n} in the window)", triggers[-1:], [inp]
        if n < self.crash_loop_count:
            self.history.append(inp)
            self.last_note = (f"{name} exited unexpectedly (pid {inp.pid}): crash {n} of "
                              f"{self.crash_loop_count} within {_window_text(window)}")
            return None
        span = (recent[-1].at_ns - recent[0].at_ns) / 1e9
        reason = (f"crash loop: {name} exited unexpectedly {n} times in {span:.1f} s "
                  f"(limit {self.crash_loop_count} within {_window_text(window)})")
        return reason, triggers, recent
