"""What the sans-IO Kraken session asks its I/O shell to do.

`ingest.protocol.KrakenSession` never touches a socket or a clock: every public method
returns a list of the actions below, and the shell (ingest/app.py) executes them **in
order**. Order matters: a `ToBookd(PairInfo)` comes before the `Send` that subscribes
that pair's book, so bookd always knows a pair's precisions before its first frame.

=================  ======================================================================
action             what the shell does
=================  ======================================================================
`Connect`          open a WebSocket to `url` within `timeout_s`; then call exactly one of
                   `session.on_connected(now_ns, conn_id)` (with a connection id unique
                   across ingest restarts) or `session.on_connect_failed(now_ns, reason)`
`Send`             send `text` as one WebSocket text frame on the current connection
`Close`            close the current connection (or abandon the one being opened). The
                   session already treats it as gone: there is no need to report
                   `on_disconnected` for it, and frames still queued from it are dropped
`ForwardBook`      forward `frame` to bookd exactly like a book frame the shell peeked
                   itself (only produced when `on_frame` was handed a book frame)
`ToBookd`          `messages.pack_control(message, conn_id, pair_index)` to bookd, on the
                   same socket as the book frames (PairInfo, Stale, ConnectionState)
`Publish`          send the bus event to the bus (its topic is `bus.schema.topic_for`)
`ScheduleWake`     call `session.on_timer(now_ns)` at `at_ns` (unix ns) or soon after.
                   One wake is pending at a time: a new ScheduleWake replaces the old one
                   (it is only ever earlier, or issued by `on_timer` itself)
`Log`              one log line at `level` (the `logging` level numbers)
=================  ======================================================================

Pure module: frozen msgspec Structs only.
"""

from __future__ import annotations

import msgspec

from bus.schema import (
    MarketDataOHLCVEvent,
    MarketDataTradeEvent,
    PotentialHaltTriggerEvent,
    SystemStateEvent,
)
from ingest.messages import NO_PAIR, ConnectionState, PairInfo, Stale

__all__ = [
    "Action", "BusEvent", "Close", "Connect", "ForwardBook", "Log", "Publish",
    "ScheduleWake", "Send", "ToBookd", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL",
]

# The `logging` level numbers, so that `Log` stays plain data.
DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50

BusEvent = (MarketDataTradeEvent | MarketDataOHLCVEvent | SystemStateEvent
            | PotentialHaltTriggerEvent)


class Connect(msgspec.Struct, frozen=True):
    """Open a WebSocket connection."""

    url: str
    attempt: int  # 1 for the first connection; n + 1 after n consecutive failures
    timeout_s: float  # [data_ingestor] connection_timeout_s; the shell enforces it


class Send(msgspec.Struct, frozen=True):
    """Send one text frame (a subscribe, unsubscribe or ping request)."""

    text: bytes


class Close(msgspec.Struct, frozen=True):
    """Close the current connection; `reason` is for the log."""

    reason: str


class ForwardBook(msgspec.Struct, frozen=True):
    """Forward a book frame that reached `on_frame` instead of the shell's fast path."""

    frame: bytes
    symbol: str


class ToBookd(msgspec.Struct, frozen=True):
    """A control message for bookd."""

    message: PairInfo | Stale | ConnectionState
    pair_index: int = NO_PAIR  # index in [trading] pairs, NO_PAIR for ConnectionState


class Publish(msgspec.Struct, frozen=True):
    """A bus event: trades, candles, system states and halt triggers."""

    event: BusEvent


class ScheduleWake(msgspec.Struct, frozen=True):
    """Call `on_timer` at `at_ns` (the same clock as every `now_ns`)."""

    at_ns: int


class Log(msgspec.Struct, frozen=True):
    """One log line."""

    level: int
    message: str


Action = Connect | Send | Close | ForwardBook | ToBookd | Publish | ScheduleWake | Log
