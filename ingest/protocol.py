"""The Kraken Spot WebSocket v2 session, sans I/O.

Theory of operation
===================
`KrakenSession` is the whole client-side protocol of ingest in the style of h11 and
wsproto: it owns no socket, no clock, no task. The I/O shell (ingest/app.py) feeds it
what happened, each time with ``now_ns``, and executes the actions it returns
(`ingest.actions`), in order::

    shell                                  session
    -----                                  -------
    start(now)                         ->  [Connect]
    connected / failed                 ->  on_connected(now, conn_id) / on_connect_failed(now, why)
    every non-book frame               ->  on_frame(frame, now)          -> [actions]
    every book frame (hot path)        ->  on_book_frame(symbol, is_snapshot, now) -> bool
    ScheduleWake(at) came due          ->  on_timer(now)                 -> [actions]
    socket closed by the peer          ->  on_disconnected(now, why, conn_id)
    bookd's ResyncRequest              ->  request_resync(pairs, now, conn_id)
    SIGTERM                            ->  stop(now)

``now_ns`` is unix time in ns (``time.time_ns()``), the same value the shell stamps on
the frame it forwards: one clock read per frame. (A step of the wall clock can fire a
liveness timer early once; NTP slews, steps are rare.)

The hot path. The shell peeks each frame (`wire.peek_channel`); for ``book`` it peeks
the symbol (`wire.peek_symbol`) and whether it is a snapshot, calls `on_book_frame`
(a few dict operations of liveness bookkeeping, no allocation) and, when it returns True,
forwards the bytes to bookd itself (the shell applies ``max_frame_bytes`` to them). False:
no book subscription for that pair on this connection, so no PairInfo either: drop it.
Everything else goes through `on_frame`, which decodes with `wire.decode_message`; bad
input is counted (``decode_errors``), logged and never raised.

Connection states
-----------------
==========  ===============================  ===========================================  ==========
state       event                            actions                                      next
==========  ===============================  ===========================================  ==========
IDLE        start                            Connect                                      CONNECTING
CONNECTING  on_connected(conn_id)            ToBookd(ConnectionState up), Publish          OPEN
                                             CONNECTED, Send(subscribe instrument, trade,
                                             ohlc) paced, ScheduleWake
CONNECTING  on_connect_failed                budget left: Publish RECONNECTING,            BACKOFF
                                             ScheduleWake(backoff delay)
                                             budget spent: Publish PotentialHaltTrigger    COOLDOWN
                                             + ERROR, ScheduleWake(halt_cooldown_s)
OPEN        on_timer: no frame at all for    Close, ToBookd(ConnectionState down),         BACKOFF or
            max_message_interval_s, or no    Publish DISCONNECTED, then as a failed        COOLDOWN
            heartbeat for                    connect (the budget resets first if the
            max_heartbeat_interval_s         connection stayed up healthy_after_s)
OPEN        on_disconnected                  the same without Close                       BACKOFF or
                                                                                          COOLDOWN
OPEN        frames, timers, resync           see the next table                           OPEN
BACKOFF,    on_timer at the due time         Connect                                      CONNECTING
COOLDOWN
any         stop                             Close (if a connection is open or being       CLOSED
                                             opened), ToBookd(down), Publish DISCONNECTED
CLOSED      anything                         nothing (a late on_connected gets Close)     CLOSED
==========  ===============================  ===========================================  ==========

While OPEN
----------
=============================  ==========================================================
input                          effect
=============================  ==========================================================
heartbeat                      proves the socket (heartbeat timer), not a subscription:
                               Kraken sends it at 1 Hz even while data flows
status                         Publish SystemStateEvent(engine state); the backoff floor
                               is 5 s while the engine is not ``online``
ack                            matched by req_id (`SubscriptionTable.on_ack`); refused ->
                               Publish ERROR naming the subscription and pair, others
                               unaffected, critical error
{"Error":"Exceeded msg rate"}  every request still unacked re-queued at the head; new
                               requests paused for a jittered 1-30 s; retried paced
instrument snapshot (first)    ToBookd(PairInfo) for each configured pair, then its book
                               subscription is queued; a pair missing from the snapshot ->
                               Publish ERROR (pair set), no book, critical error
instrument update              pair status change -> Publish SystemStateEvent (pair set)
                               and a new PairInfo; a precision change also resyncs it
trade / ohlc                   Publish MarketDataTradeEvent / MarketDataOHLCVEvent
                               (`ingest.normalize`); data marks the subscription live
book frame                     liveness of that book; forwarded by the shell
on_timer                       ack timeouts re-queue; a book/ohlc/instrument acked without
                               first data for snapshot_timeout_s, or a live book silent
                               for book_silence_s -> Publish STALE (+ ToBookd Stale for a
                               book), that one key resubscribed (unsubscribe, ack,
                               subscribe, snapshot), never a reconnect; a ping (pong
                               counted) when nothing was sent for ping_interval_s
request_resync(pairs)          the same resubscription for those books, touching no other
=============================  ==========================================================

Requests go out through one `Pacer` (at most ``[ingest] requests_per_s`` per second,
evenly spaced), batched ``symbols_per_request`` symbols per request, each with a fresh
``req_id``. Book subscriptions wait for the instrument snapshot, so bookd gets every
pair's PairInfo (precisions) before that pair's first book frame on a connection.

Errors that mean the feed cannot deliver what is configured (refused subscriptions,
pairs missing from the instrument snapshot, server errors, undecodable frames, requests
never answered while other frames arrive) are critical errors: ``critical_error_threshold_before_halt`` of them
within `CRITICAL_WINDOW_S` publish a PotentialHaltTriggerEvent (and the count starts
over). Reconnects have their own budget (`ingest.backoff`).
"""

from __future__ import annotations

import random
from collections import deque
from enum import StrEnum

import msgspec

from bus.schema import CONNECTED, DISCONNECTED, ERROR, RECONNECTING, STALE
from ingest import actions as act
from ingest import wire
from ingest.actions import (
    Action,
    Close,
    Connect,
    ForwardBook,
    Log,
    Publish,
    ScheduleWake,
    Send,
    ToBookd,
)
from ingest.backoff import (
    MAINTENANCE_FLOOR_S,
    NS_PER_S,
    ReconnectBackoff,
    jittered_ns,
    seconds_to_ns,
)
from ingest.config import Config
from ingest.messages import ConnectionState, PairInfo, Stale
from ingest.normalize import (
    CandleCloser,
    PairStatus,
    halt_trigger,
    status_events,
    system_event,
    trade_events,
)
from ingest.subscriptions import (
    BOOK,
    INSTRUMENT,
    OHLC,
    TRADE,
    AckKind,
    AckOutcome,
    Finding,
    Pacer,
    SubKey,
    SubscriptionTable,
)

__all__ = ["KrakenSession", "SessionState", "COUNTERS", "CRITICAL_WINDOW_S"]

CRITICAL_WINDOW_S = 300.0  # critical errors are counted over this sliding window
RATE_PAUSE_BASE_S = 1.0  # pause after "Exceeded msg rate": jittered 1 s, 2 s, 4 s...
RATE_PAUSE_CAP_S = 30.0
_RATE_LIMIT_TEXT = "exceeded msg rate"
_MIN_WAKE_NS = 1_000_000  # a wake is never scheduled closer than 1 ms from now

# Counters, monotonic: `frames` are what on_frame got (book frames are `book_frames`);
# `book_frames_dropped`, `ignored_frames` (no open connection) and `oversized_frames` were
# not processed; `requests` are subscribe/unsubscribe requests sent (`pings` apart); `acks`
# successful subscribe and unsubscribe acks; `stale` subscriptions found stale; `resyncs`
# resubscriptions asked by bookd or by a precision change; `connects` every Connect and
# `reconnects` those after the first.
COUNTERS = (
    "frames", "book_frames", "book_frames_dropped", "ignored_frames", "oversized_frames",
    "decode_errors", "heartbeats", "pongs", "pings", "requests", "acks", "refused",
    "duplicate_acks", "unmatched_acks", "ack_timeouts", "rate_limited", "server_errors",
    "trades", "candles", "candles_dropped", "normalize_errors", "missing_pairs", "stale",
    "resyncs", "resyncs_ignored", "connects", "reconnects", "connect_failures",
    "disconnects", "message_timeouts", "heartbeat_timeouts", "critical_errors",
    "halt_triggers",
)


class SessionState(StrEnum):
    IDLE = "idle"
    CONNECTING = "connecting"
    OPEN = "open"
    BACKOFF = "backoff"
    COOLDOWN = "cooldown"
    CLOSED = "closed"


class _Ping(msgspec.Struct):
    method: str
    req_id: int


_encode = msgspec.json.Encoder().encode


def _s(ns: int) -> str:
    return f"{ns / NS_PER_S:.1f} s"


class KrakenSession:
    """One Kraken v2 market-data session across reconnects. See the module docstring."""

    def __init__(self, cfg: Config, rng: random.Random, url: str | None = None) -> None:
        di, ing = cfg.data_ingestor, cfg.ingest
        self.url = url or di.kraken_ws_url
        self.pairs: tuple[str, ...] = tuple(cfg.trading.pairs)
        self.depth = di.book_depth
        self._pair_index = {p: i for i, p in enumerate(self.pairs)}
        self._ohlc_minutes = cfg.ohlc_minutes
        self._rng = rng
        self._connect_timeout_s = di.connection_timeout_s
        self._msg_ns = seconds_to_ns(di.max_message_interval_s)
        self._hb_ns = seconds_to_ns(di.max_heartbeat_interval_s)
        self._ping_ns = seconds_to_ns(ing.ping_interval_s)
        # No frame at all for this long: the connection itself is in doubt, and the
        # liveness timers will close it; an unanswered request is then its symptom.
        self._quiet_ns = min(self._hb_ns, self._msg_ns) // 2
        self._healthy_ns = seconds_to_ns(ing.healthy_after_s)
        self._max_frame = ing.max_frame_bytes
        self._critical_threshold = di.critical_error_threshold_before_halt
        self.backoff = ReconnectBackoff(
            rng, base_s=di.reconnect_delay_s, cap_s=di.max_reconnect_delay_s,
            max_attempts=di.max_reconnect_attempts, cooldown_s=ing.halt_cooldown_s)
        self.pacer = Pacer(ing.requests_per_s)
        self.table = SubscriptionTable(
            depth=di.book_depth, symbols_per_request=ing.symbols_per_request,
            ack_timeout_ns=seconds_to_ns(ing.snapshot_timeout_s),
            snapshot_timeout_ns=seconds_to_ns(ing.snapshot_timeout_s),
            silence_ns=seconds_to_ns(ing.book_silence_s))
        self._book_data = self.table.on_book_data  # bound once: the hot path
        self.candles = CandleCloser()
        self.pair_status = PairStatus(self.pairs)
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.state = SessionState.IDLE
        self.conn_id: int | None = None
        self.engine_state: str | None = None  # Kraken's last `status` system value
        self.pair_infos: dict[str, PairInfo] = {}  # sent to bookd on this connection
        self._books_started = False
        self._connected_ns = self._last_rx_ns = self._last_hb_ns = self._last_tx_ns = 0
        self._due_ns = 0  # BACKOFF/COOLDOWN: when to connect again
        self._wake_ns: int | None = None  # the wake the shell has pending
        self._want_ns: int | None = None  # the earliest wake wanted during this call
        self._rate_pauses = 0
        self._critical_window: deque[tuple[int, str, str | None]] = deque()

    # ================================================================== public API
    def start(self, now_ns: int) -> list[Action]:
        """Begin: the first Connect."""
        if self.state is not SessionState.IDLE:
            return []
        out: list[Action] = [Log(act.INFO, f"connecting to {self.url}")]
        self._connect(out)
        return out

    def on_connected(self, now_ns: int, conn_id: int) -> list[Action]:
        """The WebSocket of the last Connect is open; `conn_id` names it from now on."""
        if self.state is not SessionState.CONNECTING:
            return [Close(f"unexpected connection {conn_id} while {self.state}"),
                    Log(act.WARNING, f"closing unexpected connection {conn_id} ({self.state})")]
        self.state = SessionState.OPEN
        self.conn_id = conn_id
        self._connected_ns = self._last_rx_ns = self._last_hb_ns = self._last_tx_ns = now_ns
        self._reset_connection()
        text = (f"connected to {self.url} (connection {conn_id}, "
                f"attempt {self.backoff.next_attempt})")
        out: list[Action] = [ToBookd(ConnectionState(conn_id, True, self.url)),
                             Publish(system_event(now_ns, CONNECTED, text)),
                             Log(act.INFO, text)]
        self.table.add([SubKey(INSTRUMENT)]
                       + [SubKey(TRADE, p) for p in self.pairs]
                       + [SubKey(OHLC, p, m) for m in self._ohlc_minutes for p in self.pairs])
        self._flush(now_ns, out)
        self._want(self._open_deadline(now_ns))
        return self._done(now_ns, out)

    def on_connect_failed(self, now_ns: int, reason: str) -> list[Action]:
        """The last Connect failed (refused, TLS, handshake, timeout...)."""
        if self.state is not SessionState.CONNECTING:
            return []
        self.counters["connect_failures"] += 1
        out: list[Action] = [Log(act.WARNING, f"connect to {self.url} failed: {reason}")]
        self._retry(now_ns, f"connect failed: {reason}", out)
        return self._done(now_ns, out)

    def on_disconnected(self, now_ns: int, reason: str,
                        conn_id: int | None = None) -> list[Action]:
        """The peer or the network closed the connection. Ignored for a connection the
        session no longer considers current (it closed it itself, or `conn_id` differs)."""
        if self.state is not SessionState.OPEN or (conn_id is not None
                                                   and conn_id != self.conn_id):
            return []
        self.counters["disconnects"] += 1
        out: list[Action] = []
        self._drop(now_ns, f"connection lost: {reason}", out, close=False)
        return self._done(now_ns, out)

    def on_book_frame(self, symbol: str, is_snapshot: bool, now_ns: int) -> bool:
        """Liveness bookkeeping for one book frame. True: forward it to bookd."""
        self._last_rx_ns = now_ns
        c = self.counters
        c["book_frames"] += 1
        if self._book_data(symbol, now_ns, is_snapshot):
            return True
        c["book_frames_dropped"] += 1
        return False

    def on_frame(self, frame: bytes, now_ns: int) -> list[Action]:
        """Any frame other than the book frames given to `on_book_frame`."""
        c = self.counters
        c["frames"] += 1
        if self.state is not SessionState.OPEN:
            c["ignored_frames"] += 1
            return []
        self._last_rx_ns = now_ns
        out: list[Action] = []
        if len(frame) > self._max_frame:
            c["oversized_frames"] += 1
            out.append(Log(act.WARNING, f"dropped a frame of {len(frame)} bytes "
                                        f"(max_frame_bytes {self._max_frame})"))
            return out
        try:
            msg = wire.decode_message(frame)
        except wire.WireError as e:
            c["decode_errors"] += 1
            out.append(Log(act.WARNING, f"undecodable frame ({e}): {bytes(frame[:160])!r}"))
            self._critical(now_ns, f"undecodable frame: {e}", out)
            return out
        t = type(msg)
        if t is wire.Heartbeat:
            self._last_hb_ns = now_ns
            c["heartbeats"] += 1
            return out
        if t is wire.TradeMessage:
            self._on_trade(msg, now_ns, out)
        elif t is wire.OhlcMessage:
            self._on_ohlc(msg, now_ns, out)
        elif t is wire.Ack:
            self._outcomes(self.table.on_ack(msg, now_ns), now_ns, out, msg.method)
        elif t is wire.Status:
            self._on_status(msg, now_ns, out)
        elif t is wire.InstrumentMessage:
            self._on_instrument(msg, now_ns, out)
        elif t is wire.ErrorFrame:
            self._on_error(msg, now_ns, out)
        elif t is wire.Pong:
            c["pongs"] += 1
        elif t is wire.BookMessage:
            self._on_book_message(msg, frame, now_ns, out)
        self._flush(now_ns, out)
        return self._done(now_ns, out)

    def on_timer(self, now_ns: int) -> list[Action]:
        """The ScheduleWake came due (an early or extra call is harmless)."""
        self._wake_ns = None
        out: list[Action] = []
        st = self.state
        if st is SessionState.BACKOFF or st is SessionState.COOLDOWN:
            if now_ns >= self._due_ns:
                self._connect(out)
            else:
                self._want(self._due_ns)
        elif st is SessionState.OPEN:
            self._check_open(now_ns, out)
        return self._done(now_ns, out)

    def request_resync(self, pairs: list[str] | tuple[str, ...], now_ns: int,
                       conn_id: int = 0) -> list[Action]:
        """Fresh book snapshots for these pairs only: unsubscribe, ack, subscribe.

        `conn_id` (0 = the current one) is the connection whose book was bad; a request
        about an older connection is moot, its successor already sent fresh snapshots.
        """
        c = self.counters
        if self.state is not SessionState.OPEN or (conn_id and conn_id != self.conn_id):
            c["resyncs_ignored"] += len(pairs)
            return [Log(act.INFO, f"resync of {', '.join(pairs)} for connection {conn_id} "
                                  "ignored: a new connection sends fresh snapshots anyway")]
        out: list[Action] = []
        for pair in pairs:
            key = SubKey(BOOK, pair)
            if self.table.resubscribe(key):
                c["resyncs"] += 1
                out.append(Log(act.INFO, f"resync {pair}: unsubscribe, then subscribe again"))
            else:
                c["resyncs_ignored"] += 1
                st = self.table.state(key)
                why = "not subscribed" if st is None else f"subscription {st}"
                out.append(Log(act.INFO, f"resync {pair} needs nothing more ({why})"))
        self._flush(now_ns, out)
        return self._done(now_ns, out)

    def stop(self, now_ns: int) -> list[Action]:
        """Shut down: close the connection; no further actions after this."""
        out: list[Action] = []
        if self.state is SessionState.CLOSED:
            return out
        if self.state is SessionState.OPEN:
            out += [Close("stopping"),
                    ToBookd(ConnectionState(self.conn_id or 0, False, "stopping")),
                    Publish(system_event(now_ns, DISCONNECTED,
                                         f"connection {self.conn_id} closed: stopping"))]
        elif self.state is SessionState.CONNECTING:
            out.append(Close("stopping"))
        self.state = SessionState.CLOSED
        self.conn_id = None
        self.table.new_connection()
        self._wake_ns = self._want_ns = None
        out.append(Log(act.INFO, "session stopped"))
        return out

    # ================================================================== connection
    def _connect(self, out: list[Action]) -> None:
        self.state = SessionState.CONNECTING
        attempt = self.backoff.next_attempt
        self.counters["connects"] += 1
        if self.counters["connects"] > 1:
            self.counters["reconnects"] += 1
        out.append(Connect(self.url, attempt, self._connect_timeout_s))

    def _reset_connection(self) -> None:
        self.table.new_connection()
        self.pacer.reset()
        self.pair_infos = {}
        self._books_started = False
        self._rate_pauses = 0

    def _drop(self, now_ns: int, reason: str, out: list[Action], *, close: bool) -> None:
        """The current connection is gone (or being closed by us): report, back off."""
        conn = self.conn_id or 0
        if close:
            out.append(Close(reason))
        text = f"connection {conn} closed: {reason}"
        out += [ToBookd(ConnectionState(conn, False, reason)),
                Publish(system_event(now_ns, DISCONNECTED, text)),
                Log(act.WARNING, text)]
        if now_ns - self._connected_ns >= self._healthy_ns:
            self.backoff.reset()  # it was a healthy connection: a fresh budget
        self.conn_id = None
        self._reset_connection()
        self._retry(now_ns, reason, out)

    def _retry(self, now_ns: int, reason: str, out: list[Action]) -> None:
        floor = MAINTENANCE_FLOOR_S if self.engine_state not in (None, "online") else 0.0
        d = self.backoff.failure(floor)
        self._due_ns = now_ns + d.delay_ns
        self._want(self._due_ns)
        if d.halt:
            self.state = SessionState.COOLDOWN
            self.counters["halt_triggers"] += 1
            text = (f"{d.failures} consecutive connection failures "
                    f"(max_reconnect_attempts {self.backoff.max_attempts}); last: {reason}")
            out += [Publish(halt_trigger(now_ns, "RECONNECT_BUDGET_EXHAUSTED", text,
                                         f"next attempt after a cool-down of "
                                         f"{_s(d.delay_ns)} to {self.url}")),
                    Publish(system_event(now_ns, ERROR, f"{text}; cooling down "
                                                        f"{_s(d.delay_ns)}")),
                    Log(act.CRITICAL, f"{text}; halt trigger raised, cooling down "
                                      f"{_s(d.delay_ns)}")]
        else:
            self.state = SessionState.BACKOFF
            text = (f"reconnect attempt {d.failures + 1} in {d.delay_ns / NS_PER_S:.2f} s "
                    f"after: {reason}")
            out += [Publish(system_event(now_ns, RECONNECTING, text)), Log(act.INFO, text)]

    # ================================================================== timers
    def _check_open(self, now_ns: int, out: list[Action]) -> None:
        c = self.counters
        quiet = now_ns - self._last_rx_ns
        if quiet >= self._msg_ns:
            c["message_timeouts"] += 1
            self._drop(now_ns, f"no message for {_s(quiet)} "
                               f"(max_message_interval_s {_s(self._msg_ns)})", out, close=True)
            return
        no_hb = now_ns - self._last_hb_ns
        if no_hb >= self._hb_ns:
            c["heartbeat_timeouts"] += 1
            self._drop(now_ns, f"no heartbeat for {_s(no_hb)} "
                               f"(max_heartbeat_interval_s {_s(self._hb_ns)})", out, close=True)
            return
        if self.backoff.failures and now_ns - self._connected_ns >= self._healthy_ns:
            self.backoff.reset()
            out.append(Log(act.INFO, f"connection {self.conn_id} healthy for "
                                     f"{_s(self._healthy_ns)}: reconnect budget restored"))
        expired = self.table.expire(now_ns)
        if expired:
            c["ack_timeouts"] += len(expired)
            text = (f"no ack for {len(expired)} subscription request(s) "
                    f"({', '.join(map(str, expired[:5]))}...): re-queued")
            if now_ns - self._last_rx_ns < self._quiet_ns:
                out.append(Log(act.WARNING, text))
                self._critical(now_ns, text, out)  # frames flow, but not these acks
            else:  # nothing arrives at all: a dead socket, not a refused subscription
                out.append(Log(act.WARNING, f"{text}; the connection is silent, so this is "
                                            "left to the liveness timers"))
        for finding in self.table.check_liveness(now_ns):
            self._stale(now_ns, finding, out)
        if now_ns - self._last_tx_ns >= self._ping_ns and self.pacer.try_take(now_ns):
            self.counters["pings"] += 1
            self._last_tx_ns = now_ns
            out.append(Send(_encode(_Ping("ping", self.table.new_req_id()))))
        self._flush(now_ns, out)
        self._want(self._open_deadline(now_ns))

    def _open_deadline(self, now_ns: int) -> int:
        ping_at = self._last_tx_ns + self._ping_ns
        if ping_at <= now_ns:
            ping_at = self.pacer.ready_at()
        t = min(self._last_rx_ns + self._msg_ns, self._last_hb_ns + self._hb_ns, ping_at)
        if self.backoff.failures:
            t = min(t, self._connected_ns + self._healthy_ns)
        table_t = self.table.next_deadline()
        return t if table_t is None else min(t, table_t)

    def _stale(self, now_ns: int, f: Finding, out: list[Action]) -> None:
        self.counters["stale"] += 1
        key, pair = f.key, f.key.symbol
        text = f"{key} {f.reason}: resubscribing it alone"
        out.append(Publish(system_event(now_ns, STALE, text, pair=pair)))
        if key.channel == BOOK and pair is not None:
            out.append(ToBookd(Stale(self.conn_id or 0, pair, f.reason, f.silent_ns),
                               self._pair_index[pair]))
        out.append(Log(act.WARNING, text))
        self.table.resubscribe(key, missed=True)

    def _flush(self, now_ns: int, out: list[Action]) -> None:
        """Send what the pacer allows now; want a wake for the rest and new deadlines."""
        table = self.table
        while table.pending and self.pacer.try_take(now_ns):
            req = table.pop_request(now_ns)
            if req is None:
                break
            self.counters["requests"] += 1
            self._last_tx_ns = now_ns
            out.append(Send(req.text))
        if table.pending:
            self._want(self.pacer.ready_at())
        deadline = table.take_new_deadline()
        if deadline is not None:
            self._want(deadline)

    def _want(self, at_ns: int) -> None:
        if self._want_ns is None or at_ns < self._want_ns:
            self._want_ns = at_ns

    def _done(self, now_ns: int, out: list[Action]) -> list[Action]:
        """Append one ScheduleWake if this call needs an earlier wake than the pending one."""
        want, self._want_ns = self._want_ns, None
        if want is not None and self.state is not SessionState.CLOSED:
            want = max(want, now_ns + _MIN_WAKE_NS)
            if self._wake_ns is None or want < self._wake_ns:
                self._wake_ns = want
                out.append(ScheduleWake(want))
        return out

    # ================================================================== frames
    def _on_status(self, msg: wire.Status, now_ns: int, out: list[Action]) -> None:
        for event in status_events(msg, now_ns):
            self.engine_state = event.status_code
            out += [Publish(event), Log(act.INFO, event.status_message)]

    def _on_trade(self, msg: wire.TradeMessage, now_ns: int, out: list[Action]) -> None:
        events = trade_events(msg, now_ns)
        self.counters["trades"] += len(events)
        self.counters["normalize_errors"] += len(msg.data) - len(events)
        snapshot = msg.type == "snapshot"
        for symbol in {t.symbol for t in msg.data}:
            self.table.on_data(SubKey(TRADE, symbol), now_ns, snapshot)
        out += [Publish(e) for e in events]

    def _on_ohlc(self, msg: wire.OhlcMessage, now_ns: int, out: list[Action]) -> None:
        dropped = self.candles.dropped
        events = self.candles.on_ohlc(msg, now_ns)
        self.counters["candles"] += len(events)
        self.counters["candles_dropped"] += self.candles.dropped - dropped
        snapshot = msg.type == "snapshot"
        for symbol, minutes in {(c.symbol, c.interval) for c in msg.data}:
            self.table.on_data(SubKey(OHLC, symbol, minutes), now_ns, snapshot)
        out += [Publish(e) for e in events]

    def _on_book_message(self, msg: wire.BookMessage, frame: bytes, now_ns: int,
                         out: list[Action]) -> None:
        """A book frame the shell did not recognise as one (its channel not first)."""
        snapshot = msg.type == "snapshot"
        forward = [self.on_book_frame(s, snapshot, now_ns) for s in msg.symbols]
        if forward and forward[0]:
            out.append(ForwardBook(bytes(frame), msg.symbols[0]))

    def _on_instrument(self, msg: wire.InstrumentMessage, now_ns: int, out: list[Action]) -> None:
        snapshot = msg.type == "snapshot"
        self.table.on_data(SubKey(INSTRUMENT), now_ns, snapshot)
        mine = {p.symbol: p for p in msg.pairs if p.symbol in self._pair_index}
        out += [Publish(e) for e in self.pair_status.update(mine.values(), now_ns)]
        if snapshot and not self._books_started:
            self._start_books(now_ns, mine, out)
        elif self._books_started:
            for p in mine.values():
                self._pair_changed(p, out)

    def _start_books(self, now_ns: int, listed: dict[str, wire.InstrumentPair],
                     out: list[Action]) -> None:
        """PairInfo to bookd for every listed pair, then queue their book subscriptions."""
        self._books_started = True
        keys: list[SubKey] = []
        for pair in self.pairs:
            p = listed.get(pair)
            if p is None:
                self.counters["missing_pairs"] += 1
                text = (f"{pair} is not in Kraken's instrument snapshot: no book "
                        "subscription for it (check the symbol: v2 says BTC, not XBT)")
                out += [Publish(system_event(now_ns, ERROR, text, pair=pair)),
                        Log(act.ERROR, text)]
                self._critical(now_ns, text, out, pair)
                continue
            out.append(self._pair_info(p))
            keys.append(SubKey(BOOK, pair))
        self.table.add(keys)

    def _pair_info(self, p: wire.InstrumentPair) -> ToBookd:
        index = self._pair_index[p.symbol]
        info = PairInfo(self.conn_id or 0, p.symbol, index, self.depth, p.price_precision,
                        p.qty_precision, p.status, p.price_increment, p.qty_increment)
        self.pair_infos[p.symbol] = info
        return ToBookd(info, index)

    def _pair_changed(self, p: wire.InstrumentPair, out: list[Action]) -> None:
        """An instrument update (or repeated snapshot) for a configured pair."""
        old = self.pair_infos.get(p.symbol)
        if old is None:  # listed after the first snapshot: start its book now
            out += [self._pair_info(p), Log(act.INFO, f"{p.symbol} is listed now")]
            self.table.add([SubKey(BOOK, p.symbol)])
            return
        new = self._pair_info(p)
        if new.message == old:
            return
        out.append(new)
        if (old.price_precision, old.qty_precision) != (p.price_precision, p.qty_precision):
            out.append(Log(act.WARNING, f"{p.symbol} precisions changed to "
                                        f"{p.price_precision}/{p.qty_precision}: resync"))
            if self.table.resubscribe(SubKey(BOOK, p.symbol)):
                self.counters["resyncs"] += 1

    def _on_error(self, msg: wire.ErrorFrame, now_ns: int, out: list[Action]) -> None:
        c = self.counters
        if _RATE_LIMIT_TEXT in msg.error.lower():
            c["rate_limited"] += 1
            requeued = self.table.requeue_unacked()
            if now_ns >= self.pacer.held_until:  # a new episode, not the same burst
                self._rate_pauses += 1
                pause = jittered_ns(self._rng, seconds_to_ns(RATE_PAUSE_BASE_S),
                                    seconds_to_ns(RATE_PAUSE_CAP_S), self._rate_pauses)
                self.pacer.hold(now_ns + pause)
                out.append(Log(act.WARNING, f"Kraken: {msg.error}; {len(requeued)} "
                                            f"subscription(s) re-queued, requests paused "
                                            f"{pause / NS_PER_S:.2f} s"))
            return
        if msg.req_id is not None:
            outcomes = self.table.on_request_error(msg.req_id, msg.error, now_ns)
            if outcomes:
                self._outcomes(outcomes, now_ns, out, "request")
                return
        c["server_errors"] += 1
        text = f"Kraken error: {msg.error}"
        out += [Publish(system_event(now_ns, ERROR, text)), Log(act.ERROR, text)]
        self._critical(now_ns, text, out)

    def _outcomes(self, outcomes: list[AckOutcome], now_ns: int, out: list[Action],
                  method: str) -> None:
        c = self.counters
        for o in outcomes:
            kind = o.kind
            if kind is AckKind.SUBSCRIBED or kind is AckKind.UNSUBSCRIBED:
                c["acks"] += 1
                if kind is AckKind.SUBSCRIBED:
                    self._rate_pauses = 0
            elif kind is AckKind.REFUSED and o.key is not None:
                c["refused"] += 1
                key = o.key
                extra = f" at depth {self.depth}" if key.channel == BOOK else ""
                text = f"subscription {key}{extra} refused: {o.error}"
                out += [Publish(system_event(now_ns, ERROR, text, pair=key.symbol)),
                        Log(act.ERROR, text)]
                self._critical(now_ns, text, out, key.symbol)
            elif kind is AckKind.DUPLICATE:
                c["duplicate_acks"] += 1
            else:
                c["unmatched_acks"] += 1
                out.append(Log(act.WARNING, f"unmatched {method} answer (req_id {o.req_id}): "
                                            f"{o.error or 'success'}"))

    def _critical(self, now_ns: int, detail: str, out: list[Action],
                  pair: str | None = None) -> None:
        """Count a critical error; at the threshold within the window, a halt trigger."""
        self.counters["critical_errors"] += 1
        window = self._critical_window
        window.append((now_ns, detail, pair))
        horizon = now_ns - seconds_to_ns(CRITICAL_WINDOW_S)
        while window and window[0][0] < horizon:
            window.popleft()
        if len(window) >= self._critical_threshold:
            reason = (f"{len(window)} critical errors within {CRITICAL_WINDOW_S:g} s "
                      f"(critical_error_threshold_before_halt {self._critical_threshold})")
            details = "; ".join(d for _, d, _ in list(window)[-5:])
            pairs = {p for _, _, p in window}
            self.counters["halt_triggers"] += 1
            out += [Publish(halt_trigger(now_ns, "CRITICAL_ERROR_THRESHOLD", reason, details,
                                         pairs.pop() if len(pairs) == 1 else None)),
                    Log(act.CRITICAL, f"halt trigger: {reason}: {details}")]
            window.clear()
