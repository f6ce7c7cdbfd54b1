"""Fault injection for the replay server: specs, parsing and the server-wide state.

A fault spec is `KIND` or `KIND:key=value[,key=value...]`. The same text works as a
`--fault SPEC` flag at start, as the control command `fault SPEC` at run time, and as
`ReplayServer.arm_fault(SPEC)` (or `server.faults.arm(SPEC)`) in tests. `clear` removes
every armed fault.

=============================================  ==========================================
spec                                           effect
=============================================  ==========================================
drop                                           close every open connection now (no close
                                               frame); armed with none open, the next one
                                               right after its status frame
drop:after=N                                   close the connection that sends the N-th
                                               data frame from now, after sending it
stall[:seconds=S]                              no data frames (book, trade, ohlc, snapshots)
                                               to anyone; heartbeats, acks and pongs go on.
                                               The timeline pauses, nothing is lost.
                                               Without seconds: until `clear`
stall-all[:seconds=S]                          nothing at all, heartbeats included; requests
                                               are answered when it ends
silence:pair=P[,seconds=S]                     P's book frames are not sent (P's book keeps
                                               advancing, so a resubscribe gets a correct
                                               snapshot; one asked for during the silence
                                               comes when it ends); other pairs, trades and
                                               heartbeats go on
corrupt:pair=P[,count=once|N|always]           P's next outgoing book frame(s) carry a wrong
                                               checksum (the server's books stay correct)
skip:pair=P[,count=N]                          P's next N book frames (default 1) are not
                                               sent: the client's book goes wrong
garbage                                        one text frame that is not JSON
truncated                                      one book frame cut in the middle
oversized[:bytes=N]                            one valid JSON frame of N bytes (default
                                               5 MiB, 5242880)
status:system=S                                a status frame with system S (online,
                                               maintenance, cancel_only, post_only), same
                                               connection_id; new connections see S too
refuse:channel=C[,pair=P]                      the next subscribe to channel C (for pair P)
                                               is refused: success false and an error
slow-acks:ms=N                                 subscribe/unsubscribe are answered (and take
                                               effect) N ms late; ms=0 turns it off
rate-limit[:count=N]                           the next N (default 1) subscribe requests get
                                               {"Error":"Exceeded msg rate"}
=============================================  ==========================================

`drop`, `garbage`, `truncated`, `oversized` and `status` act at once on every open
connection (held for the next connection when none is open). The rest change how the
server behaves from now on, server-wide, until used up, timed out or cleared. `clear`
also brings the system state back to online (telling open connections if it changed).

This module is pure: the clock is passed in (`FaultState(clock)`), no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from msgspec import Struct

__all__ = ["FaultError", "FaultSpec", "FaultState", "parse_fault", "FAULT_TABLE",
           "IMMEDIATE", "SYSTEM_STATES", "fault_help", "SEND", "SKIP", "SILENCE", "CORRUPT"]

DEFAULT_OVERSIZED = 5 * 1024 * 1024
SYSTEM_STATES = ("online", "maintenance", "cancel_only", "post_only")
IMMEDIATE = ("drop", "garbage", "truncated", "oversized", "status")

# What --help prints: (syntax, effect), one row per kind.
FAULT_TABLE: tuple[tuple[str, str], ...] = (
    ("drop", "close every open connection now (the next one if none is open)"),
    ("drop:after=N", "close the connection after N more data frames"),
    ("stall[:seconds=S]", "stop all data; heartbeats and acks go on (until clear)"),
    ("stall-all[:seconds=S]", "stop everything, heartbeats included"),
    ("silence:pair=P[,seconds=S]", "P's book goes silent; other pairs and heartbeats go on"),
    ("corrupt:pair=P[,count=once|N|always]", "wrong checksum in P's next book frame(s)"),
    ("skip:pair=P[,count=N]", "do not send P's next N book frames (default 1)"),
    ("garbage", "send one text frame that is not JSON"),
    ("truncated", "send one book frame cut in the middle"),
    ("oversized[:bytes=N]", "send one valid JSON frame of N bytes (default 5 MiB)"),
    ("status:system=S", "send status with system S: " + "|".join(SYSTEM_STATES)),
    ("refuse:channel=C[,pair=P]", "refuse the next subscribe to C (for P)"),
    ("slow-acks:ms=N", "answer subscribe/unsubscribe N ms late (0: off)"),
    ("rate-limit[:count=N]", "the next N subscribe requests get Exceeded msg rate"),
)

# kind -> (allowed keys, required keys)
_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "drop": (frozenset({"after"}), frozenset()),
    "stall": (frozenset({"seconds"}), frozenset()),
    "stall-all": (frozenset({"seconds"}), frozenset()),
    "silence": (frozenset({"pair", "seconds"}), frozenset({"pair"})),
    "corrupt": (frozenset({"pair", "count"}), frozenset({"pair"})),
    "skip": (frozenset({"pair", "count"}), frozenset({"pair"})),
    "garbage": (frozenset(), frozenset()),
    "truncated": (frozenset(), frozenset()),
    "oversized": (frozenset({"bytes"}), frozenset()),
    "status": (frozenset({"system"}), frozenset({"system"})),
    "refuse": (frozenset({"channel", "pair"}), frozenset({"channel"})),
    "slow-acks": (frozenset({"ms"}), frozenset({"ms"})),
    "rate-limit": (frozenset({"count"}), frozenset()),
}

ALWAYS = -1
SEND, SKIP, SILENCE, CORRUPT = 0, 1, 2, 3


class FaultError(ValueError):
    """A fault spec that cannot be parsed; the message says what is allowed."""


class FaultSpec(Struct, frozen=True):
    """One parsed fault. Only the fields of its kind are set."""

    kind: str
    text: str
    after: int | None = None
    seconds: float | None = None
    pair: str | None = None
    count: int = 1              # corrupt/skip/rate-limit; ALWAYS (-1) for corrupt always
    nbytes: int = DEFAULT_OVERSIZED
    system: str | None = None
    channel: str | None = None
    ms: int = 0


def fault_help() -> str:
    width = max(len(s) for s, _ in FAULT_TABLE)
    return "\n".join(f"  {s.ljust(width)}  {d}" for s, d in FAULT_TABLE)


def _int(kind: str, key: str, value: str, minimum: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise FaultError(f"fault {kind}: {key} must be an integer, got {value!r}") from None
    if n < minimum:
        raise FaultError(f"fault {kind}: {key} must be >= {minimum}, got {n}")
    return n


def parse_fault(text: str) -> FaultSpec:
    """Parse `KIND[:key=value,...]`. Raises FaultError naming the allowed syntax."""
    text = text.strip()
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind not in _KEYS:
        raise FaultError(f"unknown fault {kind!r}; known: {', '.join(_KEYS)}")
    allowed, required = _KEYS[kind]
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq or not value.strip():
            raise FaultError(f"fault {kind}: expected key=value, got {item!r}")
        if key not in allowed:
            keys = ", ".join(sorted(allowed)) or "none"
            raise FaultError(f"fault {kind}: unknown key {key!r} (allowed: {keys})")
        params[key] = value.strip()
    missing = required - params.keys()
    if missing:
        syntax = next(s for s, _ in FAULT_TABLE if s.split(":")[0].split("[")[0] == kind)
        raise FaultError(f"fault {kind}: needs {', '.join(sorted(missing))} ({syntax})")
    fields: dict = {}
    if "after" in params:
        fields["after"] = _int(kind, "after", params["after"], 0)
    if "seconds" in params:
        try:
            s = float(params["seconds"])
        except ValueError:
            raise FaultError(f"fault {kind}: seconds must be a number") from None
        if not (s > 0 and math.isfinite(s)):
            raise FaultError(f"fault {kind}: seconds must be > 0")
        fields["seconds"] = s
    if "pair" in params:
        fields["pair"] = params["pair"].upper()
    if "count" in params:
        c = params["count"].lower()
        if kind == "corrupt" and c in ("once", "always"):
            fields["count"] = 1 if c == "once" else ALWAYS
        else:
            fields["count"] = _int(kind, "count", c, 1)
    if "bytes" in params:
        fields["nbytes"] = _int(kind, "bytes", params["bytes"], 64)
    if "system" in params:
        system = params["system"].lower()
        if system not in SYSTEM_STATES:
            raise FaultError(f"fault status: system must be one of {', '.join(SYSTEM_STATES)}")
        fields["system"] = system
    if "channel" in params:
        channel = params["channel"].lower()
        if channel not in ("book", "trade", "ohlc", "instrument"):
            raise FaultError("fault refuse: channel must be book, trade, ohlc or instrument")
        fields["channel"] = channel
    if "ms" in params:
        fields["ms"] = _int(kind, "ms", params["ms"], 0)
    return FaultSpec(kind, text, **fields)


class FaultState:
    """The armed faults of one server, shared by its sessions. Pure; clock passed in.

    Sessions ask it per frame only while `data_active` is true, so an idle fault state
    costs one attribute read per frame.
    """

    def __init__(self, clock: Callable[[], int],
                 notify: Callable[[FaultSpec | None], None] | None = None) -> None:
        self._clock = clock
        self.notify = notify  # the server's hook: deliver immediate faults, wake sessions
        self.system = "online"
        self.armed = 0
        self.fired: dict[str, int] = {}
        self._reset()

    def _reset(self) -> None:
        self.drop_after: int | None = None
        self.stall_until = 0.0       # monotonic ns; math.inf = until clear
        self.stall_all_until = 0.0
        self.silence: dict[str, float] = {}
        self.corrupt: dict[str, int] = {}
        self.skip: dict[str, int] = {}
        self.refusals: list[FaultSpec] = []
        self.rate_limit = 0
        self.slow_ack_ms = 0
        self.pending: list[FaultSpec] = []   # immediate faults for the next connection
        self.data_active = False

    def _fire(self, kind: str) -> None:
        self.fired[kind] = self.fired.get(kind, 0) + 1

    def _update_active(self) -> None:
        self.data_active = bool(self.drop_after is not None or self.silence or self.corrupt
                                or self.skip)

    # -- arming -----------------------------------------------------------------------
    def arm(self, spec: str | FaultSpec) -> FaultSpec:
        """Arm a fault (text or parsed). Raises FaultError for bad text."""
        f = parse_fault(spec) if isinstance(spec, str) else spec
        now = self._clock()
        until = math.inf if f.seconds is None else now + f.seconds * 1e9
        k = f.kind
        if k == "drop" and f.after:
            self.drop_after = f.after
        elif k in IMMEDIATE:
            if k == "status" and f.system:
                self.system = f.system
            self.pending.append(f)
        elif k == "stall":
            self.stall_until = until
        elif k == "stall-all":
            self.stall_all_until = until
        elif k == "silence":
            self.silence[f.pair or ""] = until
        elif k == "corrupt":
            self.corrupt[f.pair or ""] = f.count
        elif k == "skip":
            self.skip[f.pair or ""] = f.count
        elif k == "refuse":
            self.refusals.append(f)
        elif k == "slow-acks":
            self.slow_ack_ms = f.ms
        elif k == "rate-limit":
            self.rate_limit += f.count
        self.armed += 1
        self._update_active()
        if self.notify is not None:
            self.notify(f)
        return f

    def clear(self) -> None:
        """Remove every armed fault; the system state goes back to online."""
        was = self.system
        self._reset()
        self.system = "online"
        if was != "online":
            self.pending.append(FaultSpec("status", "status:system=online", system="online"))
        if self.notify is not None:
            self.notify(None)

    def take_pending(self) -> list[FaultSpec]:
        """Immediate faults not yet delivered (the server hands them to connections)."""
        out, self.pending = self.pending, []
        for f in out:
            self._fire(f.kind)
        return out

    # -- questions sessions ask ---------------------------------------------------------
    def stalled_until(self, now: int) -> float:
        """0 when data may flow, else when the stall ends (math.inf: until clear)."""
        until = max(self.stall_until, self.stall_all_until)
        if until and now >= until:
            if self.stall_until and now >= self.stall_until:
                self.stall_until = 0.0
            if self.stall_all_until and now >= self.stall_all_until:
                self.stall_all_until = 0.0
            until = max(self.stall_until, self.stall_all_until)
        return until

    def all_stalled_until(self, now: int) -> float:
        """0 unless stall-all is on; then when it ends (math.inf: until clear)."""
        until = self.stall_all_until
        if until and now >= until:
            self.stall_all_until = until = 0.0
        return until

    def silenced_until(self, symbol: str, now: int) -> float:
        until = self.silence.get(symbol, 0.0)
        if until and now >= until:
            del self.silence[symbol]
            self._update_active()
            return 0.0
        return until

    def book_action(self, symbol: str, now: int) -> int:
        """SEND, SILENCE, SKIP or CORRUPT for one outgoing book frame."""
        if self.silence and self.silenced_until(symbol, now):
            return SILENCE
        n = self.skip.get(symbol)
        if n is not None:
            if n <= 1:
                del self.skip[symbol]
                self._update_active()
            else:
                self.skip[symbol] = n - 1
            self._fire("skip")
            return SKIP
        n = self.corrupt.get(symbol)
        if n is not None:
            if n == 1:
                del self.corrupt[symbol]
                self._update_active()
            elif n > 1:
                self.corrupt[symbol] = n - 1
            self._fire("corrupt")
            return CORRUPT
        return SEND

    def data_sent(self) -> bool:
        """Count one data frame sent; True when `drop:after=N` says close now."""
        n = self.drop_after
        if n is None:
            return False
        if n <= 1:
            self.drop_after = None
            self._update_active()
            self._fire("drop")
            return True
        self.drop_after = n - 1
        return False

    def take_refusal(self, channel: str, symbol: str | None) -> FaultSpec | None:
        for i, f in enumerate(self.refusals):
            if f.channel == channel and (f.pair is None or f.pair == symbol):
                del self.refusals[i]
                self._fire("refuse")
                return f
        return None

    def take_rate_limit(self) -> bool:
        if self.rate_limit:
            self.rate_limit -= 1
            self._fire("rate-limit")
            return True
        return False

    def describe(self) -> list[str]:
        """The faults in force, for `status`."""
        now = self._clock()
        out = []
        if self.drop_after is not None:
            out.append(f"drop:after={self.drop_after}")
        for name, until in (("stall", self.stall_until), ("stall-all", self.stall_all_until)):
            if until and now < until:
                out.append(name if until == math.inf else
                           f"{name}:seconds={(until - now) / 1e9:.3f}")
        for sym, until in self.silence.items():
            if now < until:
                out.append(f"silence:pair={sym}" + ("" if until == math.inf else
                                                     f",seconds={(until - now) / 1e9:.3f}"))
        for sym, n in self.corrupt.items():
            out.append(f"corrupt:pair={sym},count={'always' if n == ALWAYS else n}")
        for sym, n in self.skip.items():
            out.append(f"skip:pair={sym},count={n}")
        out.extend(f.text for f in self.refusals)
        if self.slow_ack_ms:
            out.append(f"slow-acks:ms={self.slow_ack_ms}")
        if self.rate_limit:
            out.append(f"rate-limit:count={self.rate_limit}")
        out.extend(f"{f.text} (pending)" for f in self.pending)
        if self.system != "online":
            out.append(f"status:system={self.system}")
        return out
