"""`python -m bus.haltd [--config FILE] [--exit-on-halt | --no-exit-on-halt]`: the halt authority.

haltd is a supervisord event listener (SUPERVISORD.md B.5, B.7) that also subscribes to
the bus topic `trigger`. One `zmq.Poller` waits on its stdin (supervisord's events) and
on the SUB socket, so it stays READY for both. The pure `bus.halt_policy.HaltPolicy`
turns what it sees into one latched `HaltDecision`; haltd then

1. writes `<run dir>/halt.json` (atomically: tmp file + rename) with the decision and
   its evidence, BEFORE anything is stopped (bookd marks its books `halted` when the
   file exists);
2. publishes the decision on topic `halt` (an EVENT pushed to the bus's `bus.in`; best
   effort: with the bus down it is logged and skipped, halt.json has it);
3. stops ingest, then bookd, then bus through XML-RPC (`stopProcess(name, wait=True)`
   each; haltd is outside that set, so waiting is safe) and records the results in
   halt.json;
4. with `[haltd] exit_on_halt` or `--exit-on-halt` (the flag wins), calls
   `supervisor.shutdown()`; otherwise supervisord keeps running with the three
   programs STOPPED, for inspection.

Latched: later triggers are logged and appended to halt.json's `late_triggers`, never
acted on twice. If halt.json exists when haltd starts, a previous halt was not cleared:
haltd logs it, adopts that decision (so it will not halt again) and stops nothing. To
clear a halt: remove `run/halt.json`, `supervisorctl restart haltd`, then start the
programs (or restart supervisord).

supervisord config (`[eventlistener:haltd]`)::

    command=<python> -m bus.haltd --config <etc/krakenfeed.toml>
    events=PROCESS_STATE_EXITED,PROCESS_STATE_FATAL,REMOTE_COMMUNICATION
            ; optional: ,SUPERVISOR_STATE_CHANGE_STOPPING (then an expected exit during
            ; a supervisord shutdown is not treated as "a component left")
    priority=50            ; starts first, stops last
    autorestart=true
    buffer_size=100
    stdout_logfile=NONE    ; stdout is the protocol channel
    redirect_stderr=false  ; MUST stay false for listeners
    stderr_logfile=<run>/haltd.log

stdout carries protocol tokens only: `main()` moves fd 1 to a private descriptor and
points fd 1 (and `sys.stdout`) at stderr, so a stray print cannot put the listener into
supervisord's UNKNOWN state. Events about haltd itself are ignored; events about
programs outside ingest/bookd/bus (e.g. `replay`) are logged but never halt.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import msgspec

from bus import schema
from bus.halt_policy import (
    HaltPolicy,
    PolicyInput,
    ProcessEvent,
    RemoteComm,
    SupervisorState,
    TriggerInput,
)
from bus.schema import HaltDecision, HaltTrigger
from bus.supervisor_rpc import StopResult, shutdown, stop_in_order

log = logging.getLogger("haltd")

HALT_FILE = "halt.json"
RECORD_FORMAT = "krakenfeed-halt"
RECORD_VERSION = 1
READY = b"READY\n"
RESULT_OK = b"RESULT 2\nOK"
_PROCESS_KINDS = ("EXITED", "FATAL", "STOPPED", "STOPPING", "STARTING", "RUNNING",
                  "BACKOFF")


class HaltRecord(msgspec.Struct, kw_only=True):
    """The content of run/halt.json."""

    format: str = RECORD_FORMAT
    version: int = RECORD_VERSION
    decision: HaltDecision
    evidence: list[PolicyInput] = []  # the inputs that made the decision
    history: list[PolicyInput] = []  # earlier notable inputs that did not halt
    late_triggers: list[HaltTrigger] = []  # triggers after the latch, not acted on
    stop_results: list[StopResult] = []  # one per stopProcess call, in call order
    completed: bool = False  # the ordered stops ran (see stop_results for each outcome)
    exit_on_halt: bool = False
    namespace: str = ""
    haltd_pid: int = 0
    written_at: str = ""  # RFC3339 of the last rewrite


_record_encoder = msgspec.json.Encoder()
_record_decoder = msgspec.json.Decoder(HaltRecord)


def read_halt_record(path: str | os.PathLike[str]) -> HaltRecord:
    """Parse a halt.json; raises OSError or msgspec.DecodeError/ValidationError."""
    return _record_decoder.decode(Path(path).read_bytes())


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a tmp file in the same directory, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- the listener stream ----------------------------------------------------------------
def parse_tokens(line: str) -> dict[str, str]:
    """`key:value key:value ...` -> dict (like childutils.get_headers, tolerant)."""
    out: dict[str, str] = {}
    for token in line.split():
        key, sep, value = token.partition(":")
        if sep:
            out[key] = value
    return out


class EventParser:
    """Bytes from supervisord -> complete `(headers, payload)` events.

    Reads go through our own buffer (os.read on the fd, never Python's buffered stdin,
    which could hold data that poll() no longer reports).
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.errors = 0

    def feed(self, data: bytes) -> list[tuple[dict[str, str], str]]:
        self.buf += data
        events: list[tuple[dict[str, str], str]] = []
        while True:
            nl = self.buf.find(b"\n")
            if nl < 0:
                return events
            headers = parse_tokens(self.buf[:nl].decode("utf-8", "replace"))
            try:
                size = int(headers["len"])
            except (KeyError, ValueError):
                self.errors += 1
                log.error("bad event header line %r: skipped", bytes(self.buf[:nl][:200]))
                del self.buf[:nl + 1]
                continue
            if len(self.buf) < nl + 1 + size:
                return events
            payload = bytes(self.buf[nl + 1:nl + 1 + size]).decode("utf-8", "replace")
            del self.buf[:nl + 1 + size]
            events.append((headers, payload))


def to_input(headers: dict[str, str], payload: str, at_ns: int) -> PolicyInput | None:
    """A supervisord event as a policy input, or None for events the policy ignores."""
    name = headers.get("eventname", "")
    if name.startswith("PROCESS_STATE_"):
        kind = name[len("PROCESS_STATE_"):]
        # PROCESS_STATE payloads are one token line, no trailing newline.
        body = parse_tokens(payload.split("\n", 1)[0])
        try:
            pid = int(body.get("pid", "0") or 0)
        except ValueError:
            pid = 0
        return ProcessEvent(kind=kind if kind in _PROCESS_KINDS else "UNKNOWN",
                            program=body.get("processname", ""),
                            group=body.get("groupname", ""),
                            from_state=body.get("from_state", ""),
                            expected=body.get("expected") == "1", pid=pid, at_ns=at_ns)
    if name == "REMOTE_COMMUNICATION":
        head, _, data = payload.partition("\n")
        return RemoteComm(type=parse_tokens(head).get("type", ""), data=data, at_ns=at_ns)
    if name == "SUPERVISOR_STATE_CHANGE_STOPPING":
        return SupervisorState(state="STOPPING", at_ns=at_ns)
    if name == "SUPERVISOR_STATE_CHANGE_RUNNING":
        return SupervisorState(state="RUNNING", at_ns=at_ns)
    return None


# --- the bus ----------------------------------------------------------------------------
class BusSink(Protocol):
    def publish(self, decision: HaltDecision) -> bool: ...


class ZmqBusSink:
    """Pushes the HaltDecision to the bus's `bus.in` (IMMEDIATE: never queued for a
    bus that is not connected, so a later bus start cannot replay a stale halt)."""

    def __init__(self, ctx: Any, endpoint: str) -> None:
        import zmq

        self._zmq = zmq
        self.endpoint = endpoint
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.SNDHWM, 100)
        self.sock.connect(endpoint)

    def publish(self, decision: HaltDecision) -> bool:
        from ingest.messages import pack_event

        msg = pack_event(schema.HALT_TOPIC, "HaltDecision", msgspec.json.encode(decision))
        try:
            self.sock.send(msg, self._zmq.NOBLOCK)
        except self._zmq.ZMQError as e:
            log.warning("HaltDecision not published: bus not reachable at %s (%s); "
                        "halt.json has it", self.endpoint, e)
            return False
        log.info("HaltDecision pushed to the bus (topic halt)")
        return True

    def close(self) -> None:
        self.sock.close(linger=200)


# --- the core ---------------------------------------------------------------------------
class Haltd:
    """The listener core: inputs in, protocol tokens out, the halt sequence.

    Everything it touches is injected (stdout stream, RPC object, bus sink, clock, run
    dir), so tests drive it without supervisord or sockets.
    """

    def __init__(self, *, run_path: Path, policy: HaltPolicy, rpc: Any,
                 bus_sink: BusSink | None, out: BinaryIO, exit_on_halt: bool = False,
                 namespace: str = "", self_name: str = "haltd",
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.halt_path = Path(run_path) / HALT_FILE
        self.policy = policy
        self.rpc = rpc
        self.bus_sink = bus_sink
        self.out = out
        self.exit_on_halt = exit_on_halt
        self.namespace = namespace
        self.self_name = self_name
        self.clock = clock
        self.parser = EventParser()
        self.record: HaltRecord | None = None
        self.halt_done = False
        self._trigger_seq: tuple[int, int] | None = None  # (epoch, seq) on topic trigger
        self.terminate: str | None = None  # set by the SIGTERM/SIGINT handler
        self.counters = {"events": 0, "bus_messages": 0, "bad_bus_messages": 0,
                         "trigger_gaps": 0, "errors": 0}

    # -- start -------------------------------------------------------------------------
    def check_previous_halt(self) -> bool:
        """If halt.json exists, adopt that halt (latched, nothing stopped). True if so."""
        if not self.halt_path.exists():
            return False
        try:
            record = read_halt_record(self.halt_path)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
            log.error("SYSTEM HALTED: %s exists but cannot be read (%s); not clearing it. "
                      "haltd will not act on new triggers until it is removed and haltd "
                      "is restarted", self.halt_path, e)
            self.policy.latch_external(HaltDecision(
                timestamp=schema.ns_to_rfc3339(self.clock()),
                reason=f"previous halt ({self.halt_path} unreadable)", triggers=[],
                stopped=[]))
            self.halt_done = True
            return True
        log.error("SYSTEM HALTED since %s: %s. The previous halt was not cleared (%s); "
                  "haltd stops nothing and records new triggers as late. To clear: "
                  "remove the file, restart haltd, start the programs",
                  record.decision.timestamp, record.decision.reason, self.halt_path)
        if not record.completed:
            log.error("the previous halt did not finish its stops (stop results: %s)",
                      [(r.program, r.outcome) for r in record.stop_results] or "none")
        self.policy.latch_external(record.decision)
        self.record = record
        self.halt_done = True
        return True

    # -- protocol output ---------------------------------------------------------------
    def _send(self, token: bytes) -> None:
        self.out.write(token)
        self.out.flush()

    def ready(self) -> None:
        self._send(READY)

    # -- inputs ------------------------------------------------------------------------
    def on_stdin_data(self, data: bytes) -> None:
        """Bytes from supervisord: answer every complete event (RESULT, then READY)."""
        for headers, payload in self.parser.feed(data):
            try:
                pending = self.on_supervisor_event(headers, payload)
            except Exception:  # a bug must not kill the halt authority: log, count, go on
                self.counters["errors"] += 1
                log.exception("event %r %r could not be handled", headers, payload[:200])
                pending = None
            self._send(RESULT_OK)
            self.ready()
            if pending is not None:
                self.finish_halt(pending)

    def on_supervisor_event(self, headers: dict[str, str],
                            payload: str) -> HaltDecision | None:
        """One event; returns a decision whose stops are still to be done, else None."""
        self.counters["events"] += 1
        name = headers.get("eventname", "?")
        inp = to_input(headers, payload, self.clock())
        if inp is None:
            log.debug("event %s ignored", name)
            return None
        if isinstance(inp, ProcessEvent) and inp.program == self.self_name:
            log.info("event %s about haltd itself ignored", name)
            return None
        log.info("event %s serial %s: %s", name, headers.get("serial", "?"),
                 payload.replace("\n", " | ")[:300])
        return self.feed(inp)

    def on_bus_message(self, msg: bytes) -> HaltDecision | None:
        """One message from the SUB socket (topic `trigger`)."""
        self.counters["bus_messages"] += 1
        try:
            topic, payload = schema.split_frame(msg)
            env, event = schema.decode_envelope_json(payload)
        except (schema.SchemaError, msgspec.DecodeError, msgspec.ValidationError,
                UnicodeDecodeError) as e:
            self.counters["bad_bus_messages"] += 1
            log.warning("bad bus message (%s): %r", e, bytes(msg[:120]))
            return None
        if topic != schema.TRIGGER_TOPIC or not isinstance(
                event, schema.PotentialHaltTriggerEvent):
            self.counters["bad_bus_messages"] += 1
            log.warning("unexpected %s on topic %s ignored", env.type, topic)
            return None
        last = self._trigger_seq
        if last is not None and last[0] == env.epoch and env.seq > last[1] + 1:
            self.counters["trigger_gaps"] += 1
            log.warning("lost %d trigger message(s) on the bus (seq %d -> %d)",
                        env.seq - last[1] - 1, last[1], env.seq)
        self._trigger_seq = (env.epoch, env.seq)
        log.warning("trigger from %s: %s %s%s", event.source_module, event.error_code,
                    event.reason, f" ({event.pair})" if event.pair else "")
        decision = self.feed(TriggerInput(event=event, at_ns=self.clock()))
        if decision is not None:
            self.finish_halt(decision)
        return decision

    def feed(self, inp: PolicyInput) -> HaltDecision | None:
        """Policy step. On a new decision: halt.json and the bus, not the stops yet."""
        late_before = len(self.policy.late_triggers)
        decision = self.policy.feed(inp)
        if decision is not None:
            log.error("HALT DECIDED: %s", decision.reason)
            for t in decision.triggers:
                log.error("  trigger %s %s at %s: %s%s", t.source, t.error_code, t.at,
                          t.reason, f" ({t.pair})" if t.pair else "")
            self.begin_halt(decision)
            return decision
        log.info("%s", self.policy.last_note)
        new_late = self.policy.late_triggers[late_before:]
        if new_late:
            for t in new_late:
                log.warning("late trigger (already halted, not acted on): %s %s: %s",
                            t.source, t.error_code, t.reason)
            if self.record is not None:
                self.record.late_triggers.extend(new_late)
                self._write_record()
        return None

    # -- the halt ----------------------------------------------------------------------
    def begin_halt(self, decision: HaltDecision) -> None:
        """Steps 1 and 2: halt.json (before anything is stopped), then the bus."""
        self.record = HaltRecord(
            decision=decision, evidence=list(self.policy.evidence),
            history=list(self.policy.history),
            late_triggers=list(self.policy.late_triggers), exit_on_halt=self.exit_on_halt,
            namespace=self.namespace, haltd_pid=os.getpid())
        self._write_record()
        if self.bus_sink is not None:
            self.bus_sink.publish(decision)

    def finish_halt(self, decision: HaltDecision) -> None:
        """Steps 3 and 4: the ordered stops, then (optionally) supervisord's shutdown."""
        self.halt_done = True
        if self.rpc is None:
            log.error("no supervisord RPC (SUPERVISOR_SERVER_URL unset): cannot stop %s",
                      ", ".join(decision.stopped))
            return
        start = self.clock()
        results = stop_in_order(self.rpc, decision.stopped)
        log.error("halt: stops done in %.3f s: %s", (self.clock() - start) / 1e9,
                  ", ".join(f"{r.program}={r.outcome}" for r in results))
        if self.record is not None:
            self.record.stop_results.extend(results)
            self.record.completed = True
            self._write_record()
        if self.exit_on_halt:
            shutdown(self.rpc)

    def _write_record(self) -> None:
        if self.record is None:
            return
        self.record.written_at = schema.ns_to_rfc3339(self.clock())
        try:
            write_atomic(self.halt_path, _record_encoder.encode(self.record) + b"\n")
        except OSError as e:
            log.error("cannot write %s: %s", self.halt_path, e)

    # -- the loop ----------------------------------------------------------------------
    def run(self, stdin_fd: int, sub: Any = None, poll_ms: int | None = None,
            wake_fd: int | None = None) -> int:
        """Wait on stdin (and the SUB socket) until supervisord closes stdin or a
        signal arrives.

        Signals: the handler only sets `self.terminate`; `signal.set_wakeup_fd` makes
        the C-level handler write the signal number to `wake_fd`, which is polled too.
        (Raising from the handler is unsafe: it can fire inside a finalizer, e.g. an
        HTTP response's close() after an RPC, where the exception is swallowed.) A
        signal during the ordered stops is handled after them: finishing the decided
        halt matters more than exiting at once.
        """
        import zmq

        poller = zmq.Poller()
        poller.register(stdin_fd, zmq.POLLIN)
        if sub is not None:
            poller.register(sub, zmq.POLLIN)
        if wake_fd is not None:
            poller.register(wake_fd, zmq.POLLIN)
        self.ready()
        while self.terminate is None:
            ready = dict(poller.poll(poll_ms))
            if wake_fd is not None and wake_fd in ready:
                try:
                    sig = os.read(wake_fd, 64)
                except BlockingIOError:
                    sig = b""
                if sig and self.terminate is None:
                    self.terminate = signal.Signals(sig[-1]).name
                break
            if sub is not None and sub in ready:
                for _ in range(1000):
                    try:
                        msg = sub.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        self.on_bus_message(msg)
                    except Exception:
                        self.counters["errors"] += 1
                        log.exception("bus message %r could not be handled", msg[:200])
            if stdin_fd in ready:
                data = os.read(stdin_fd, 65536)
                if not data:
                    log.info("stdin closed (supervisord went away): exiting")
                    return 0
                self.on_stdin_data(data)
        log.info("haltd: %s, exiting", self.terminate)
        return 0


# --- the process ------------------------------------------------------------------------
def _protocol_stdout() -> BinaryIO:
    """Keep fd 1 for protocol tokens only: dup it privately, point fd 1 at stderr."""
    sys.stdout.flush()
    proto_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(proto_fd, "wb", buffering=0)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bus.haltd",
        description="The halt authority: a supervisord event listener (events "
                    "PROCESS_STATE_EXITED, PROCESS_STATE_FATAL, REMOTE_COMMUNICATION) that "
                    "also subscribes to the bus topic 'trigger'. On a halt it writes "
                    "run/halt.json, publishes a HaltDecision on topic 'halt' and stops "
                    "ingest, bookd and bus in that order through supervisord.")
    ap.add_argument("--config", help="config file (default: etc/krakenfeed.toml or "
                                     "$KRAKENFEED_CONFIG)")
    ap.add_argument("--exit-on-halt", action=argparse.BooleanOptionalAction, default=None,
                    help="after a halt, shut supervisord down (default: [haltd] "
                         "exit_on_halt; the flag wins)")
    return ap


def effective_exit_on_halt(flag: bool | None, configured: bool) -> bool:
    """The flag wins over `[haltd] exit_on_halt` (DESIGN.md section 4)."""
    return configured if flag is None else flag


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    out = _protocol_stdout()
    args = build_parser().parse_args(argv)
    from ingest.config import exit_on_config_error

    cfg = exit_on_config_error(args.config, "haltd")
    logging.getLogger().setLevel(cfg.system.log_level.upper())
    exit_on_halt = effective_exit_on_halt(args.exit_on_halt, cfg.haltd.exit_on_halt)
    # SIGTERM/SIGINT: set a flag (never raise, see Haltd.run) and wake the poller.
    received: list[str] = []
    core: Haltd | None = None

    def on_signal(signum: int, frame: Any) -> None:
        received.append(signal.Signals(signum).name)
        if core is not None:
            core.terminate = received[0]

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    import zmq

    from bus.supervisor_rpc import rpc_from_env

    try:
        rpc = rpc_from_env()
    except KeyError as e:
        log.warning("%s: haltd can decide but not stop anything", e.args[0])
        rpc = None
    policy = HaltPolicy(crash_loop_count=cfg.haltd.crash_loop_count,
                        crash_loop_window_ns=int(cfg.haltd.crash_loop_window_s * 1e9))
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, schema.subscription_prefix(schema.TRIGGER_TOPIC))
    sub.connect(cfg.ipc("bus.json"))
    sink = ZmqBusSink(ctx, cfg.ipc("bus.in"))
    core = Haltd(run_path=cfg.run_path, policy=policy, rpc=rpc, bus_sink=sink, out=out,
                 exit_on_halt=exit_on_halt, namespace=cfg.namespace,
                 self_name=os.environ.get("SUPERVISOR_PROCESS_NAME", "haltd"))
    log.info("haltd: pid %d, run dir %s, exit_on_halt=%s, crash loop %d within %g s, "
             "triggers from %s", os.getpid(), cfg.run_path, exit_on_halt,
             cfg.haltd.crash_loop_count, cfg.haltd.crash_loop_window_s, cfg.ipc("bus.json"))
    if received:
        core.terminate = received[0]
    try:
        core.check_previous_halt()
        return core.run(sys.stdin.fileno(), sub, wake_fd=wake_r)
    finally:
        sub.close()
        sink.close()
        ctx.term()


if __name__ == "__main__":
    sys.exit(main())
