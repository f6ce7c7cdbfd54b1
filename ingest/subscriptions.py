"""The subscription table: one small state machine per Kraken subscription, plus pacing.

Pure: no clock, no I/O. `ingest.protocol.KrakenSession` owns one table and one `Pacer`
and feeds them acks, data and `now_ns`.

Subscriptions
-------------
A subscription is a `SubKey`: ``(channel, symbol, interval)``. ``book``, ``trade`` and
``ohlc`` have a symbol (``ohlc`` one key per configured interval, in Kraken minutes);
``instrument`` has none (it takes no symbol parameter and returns every pair).
Request parameters (PROTOCOL.md sections 1.3, 2.3-2.6)::

    book        depth=<configured>, snapshot=true   (unsubscribe: depth, no snapshot)
    trade       snapshot=false
    ohlc        interval=<minutes>, snapshot=true
    instrument  snapshot=true, no symbol

States of one key (the table holds one entry per key and connection)::

              request sent             ack success            first data
    pending ---------------> requested ------------> acked ---------------> live
     ^   ^                     |    |                  |                     |
     |   +---------------------+    +--> refused       +-- stale, or resync -+
     |   "Exceeded msg rate", or       (success:false)       |  requested
     |   no ack in time                                      v
     +---- unsubscribe ack, ---- unsubscribing <---sent--- unsub_queued
           either outcome

* ``acked -> live`` needs a snapshot for ``book`` and ``instrument`` (bookd needs one;
  PairInfo comes from it) and any data for ``trade`` and ``ohlc``.
* An ack whose error says "already subscribed" counts as success, and an unsubscribe
  refusal ("Subscription Not Found") as unsubscribed: both leave Kraken in the state we
  want. A snapshot that arrives while a key is still ``requested`` (its ack lost, or
  answering an older request) makes it ``live``.
* ``refused`` is final for the connection; the session reports it. A reconnect starts a
  fresh table (`new_connection`), since Kraken forgets every subscription.

Matching acks (`on_ack`)
------------------------
Kraken sends one ack per symbol and echoes ``req_id``. An ack is matched by ``req_id``
first, then by the symbol inside that request. A refusal without a symbol (an
unsupported depth comes back as ``{"error": ..., "method": "subscribe", "success":
false}``, no ``result``) answers every still unacked key of its request. Acks without a
usable ``req_id`` (an expired request, or a server that does not echo it) are matched
by ``(channel, symbol, interval)`` from their ``result``, then by symbol among the
requests in flight, oldest first.

Rate limits
-----------
Requests batch up to ``[ingest] symbols_per_request`` symbols of one (method, channel,
interval) into one request, in queue order within each channel, instrument first, then
books, trades and candles, and go out through a `Pacer`. After
``{"Error":"Exceeded msg rate"}`` (it names no request: Kraken answers each request
past its limit with one) `requeue_unacked` puts every key of every request still
waiting for its ack back at the head of the queue; the session pauses the pacer with a
jittered backoff. Requests stay in the in-flight map until their ack timeout, so a late
ack of a request that did get through still matches, and the re-sent duplicate is
answered "already subscribed" (success) or is a duplicate. Every key ends acked or
refused.

Liveness (`check_liveness`)
---------------------------
* a ``book``, ``ohlc`` or ``instrument`` key acked ``snapshot_timeout`` ago without its
  first data: stale (nautilus_trader#4255: acked, then silent, heartbeats flowing);
* a ``live`` book silent for ``book_silence``: stale (quiet markets are quiet: 60 s).
The session resubscribes a stale key (`resubscribe`): unsubscribe, ack, subscribe,
fresh snapshot. Each miss without data in between doubles that key's snapshot timeout
(up to 64x), so a key that never answers is retried ever more slowly, not in a loop.
"""

from __future__ import annotations

import math
from enum import StrEnum

import msgspec

from ingest.wire import Ack

__all__ = [
    "BOOK", "TRADE", "OHLC", "INSTRUMENT", "SubKey", "SubState", "AckKind", "AckOutcome",
    "Request", "Finding", "SubscriptionTable", "Pacer", "NS_PER_S",
]

NS_PER_S = 1_000_000_000
BOOK, TRADE, OHLC, INSTRUMENT = "book", "trade", "ohlc", "instrument"
CHANNELS = (INSTRUMENT, BOOK, TRADE, OHLC)
# Requests go out instrument first (PairInfo needs it), then books, trades, candles.
_PRIORITY = {INSTRUMENT: 0, BOOK: 1, TRADE: 2, OHLC: 3}
SNAPSHOT_CHANNELS = frozenset((BOOK, OHLC, INSTRUMENT))  # checked for first data after ack
STRICT_SNAPSHOT = frozenset((BOOK, INSTRUMENT))  # only a snapshot makes them live
MAX_MISS_DOUBLINGS = 6


class SubState(StrEnum):
    PENDING = "pending"  # wanted, queued for a subscribe request
    REQUESTED = "requested"  # subscribe sent, waiting for the ack
    ACKED = "acked"  # ack success, no data yet
    LIVE = "live"  # data seen
    REFUSED = "refused"  # ack success:false; final for this connection
    UNSUB_QUEUED = "unsub_queued"  # queued for an unsubscribe request (resubscribe)
    UNSUBSCRIBING = "unsubscribing"  # unsubscribe sent, waiting for the ack


_SUBSCRIBED_STATES = (SubState.ACKED, SubState.LIVE)
_WAITING = (SubState.REQUESTED, SubState.UNSUBSCRIBING)


class SubKey(msgspec.Struct, frozen=True):
    """One subscription: channel, symbol (None for instrument), ohlc interval (minutes)."""

    channel: str
    symbol: str | None = None
    interval: int | None = None

    def __str__(self) -> str:
        parts = [self.channel]
        if self.interval is not None:
            parts.append(f"{self.interval}min")
        if self.symbol is not None:
            parts.append(self.symbol)
        return " ".join(parts)


class AckKind(StrEnum):
    SUBSCRIBED = "subscribed"  # the key is acked now
    REFUSED = "refused"  # success:false (the error says why)
    UNSUBSCRIBED = "unsubscribed"  # the key is pending again (resubscribe queued)
    DUPLICATE = "duplicate"  # an answer for a key already settled
    UNMATCHED = "unmatched"  # no key of this connection matches


class AckOutcome(msgspec.Struct, frozen=True):
    kind: AckKind
    key: SubKey | None
    error: str = ""
    req_id: int | None = None


class Request(msgspec.Struct, frozen=True):
    """One subscribe or unsubscribe request, ready to send."""

    req_id: int
    method: str  # "subscribe" | "unsubscribe"
    keys: tuple[SubKey, ...]
    text: bytes


class Finding(msgspec.Struct, frozen=True):
    """A stale subscription found by `check_liveness`."""

    key: SubKey
    reason: str
    silent_ns: int


class _Params(msgspec.Struct, omit_defaults=True):
    channel: str
    symbol: list[str] | None = None
    depth: int | None = None
    interval: int | None = None
    snapshot: bool | None = None


class _Req(msgspec.Struct):
    method: str
    params: _Params
    req_id: int


_encode = msgspec.json.Encoder().encode


class _Sub:
    """Mutable per-key state (internal to the table)."""

    __slots__ = ("key", "state", "req_id", "acked_ns", "last_data_ns", "error", "misses")

    def __init__(self, key: SubKey) -> None:
        self.key = key
        self.state = SubState.PENDING
        self.req_id = 0
        self.acked_ns = 0
        self.last_data_ns = 0
        self.error = ""
        self.misses = 0


class _InFlight:
    __slots__ = ("req_id", "unsubscribe", "sent_ns", "unacked")

    def __init__(self, req_id: int, unsubscribe: bool, sent_ns: int,
                 unacked: dict[str | None, SubKey]) -> None:
        self.req_id = req_id
        self.unsubscribe = unsubscribe
        self.sent_ns = sent_ns
        self.unacked = unacked  # symbol (None for instrument) -> key, not yet answered


def _already_subscribed(error: str | None) -> bool:
    return error is not None and "already subscribed" in error.lower()


class SubscriptionTable:
    """Every subscription of the current connection, its requests and its acks."""

    def __init__(self, *, depth: int, symbols_per_request: int, ack_timeout_ns: int,
                 snapshot_timeout_ns: int, silence_ns: int) -> None:
        if symbols_per_request < 1:
            raise ValueError("symbols_per_request must be >= 1")
        self.depth = depth
        self._batch = symbols_per_request
        self._ack_timeout_ns = ack_timeout_ns
        self._snapshot_ns = snapshot_timeout_ns
        self._silence_ns = silence_ns
        self._next_req_id = 1  # never reset: a late ack of an old connection cannot match
        self._subs: dict[SubKey, _Sub] = {}
        self._queue: dict[SubKey, None] = {}  # ordered set: exactly the pending/unsub_queued keys
        self._inflight: dict[int, _InFlight] = {}  # req_id -> request, oldest first
        self._books: dict[str, _Sub] = {}  # symbol -> book sub (hot path)
        self._new_deadline: int | None = None

    # -- keys ------------------------------------------------------------------------
    def new_connection(self) -> None:
        """Forget every key and request: Kraken forgets them when the socket goes."""
        self._subs.clear()
        self._queue.clear()
        self._inflight.clear()
        self._books.clear()
        self._new_deadline = None

    def add(self, keys: list[SubKey]) -> None:
        """Want these keys subscribed (queued in this order). Known keys are kept as they are."""
        for key in keys:
            if key.channel not in CHANNELS:
                raise ValueError(f"unknown channel {key.channel!r}")
            if (key.symbol is None) != (key.channel == INSTRUMENT):
                raise ValueError(f"{key}: only instrument goes without a symbol")
            if (key.interval is None) != (key.channel != OHLC):
                raise ValueError(f"{key}: ohlc needs an interval, other channels none")
            if key in self._subs:
                continue
            sub = _Sub(key)
            self._subs[key] = sub
            self._queue[key] = None
            if key.channel == BOOK:
                self._books[key.symbol] = sub

    def new_req_id(self) -> int:
        """The next request id (also used for pings): monotonic for the table's life."""
        rid = self._next_req_id
        self._next_req_id += 1
        return rid

    def state(self, key: SubKey) -> SubState | None:
        sub = self._subs.get(key)
        return None if sub is None else sub.state

    def error(self, key: SubKey) -> str:
        sub = self._subs.get(key)
        return "" if sub is None else sub.error

    def states(self) -> dict[SubKey, SubState]:
        return {k: s.state for k, s in self._subs.items()}

    def keys(self, channel: str | None = None) -> list[SubKey]:
        return [k for k in self._subs if channel is None or k.channel == channel]

    @property
    def pending(self) -> int:
        """Keys waiting for a request to be sent."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Requests sent and not fully answered (or not yet expired)."""
        return len(self._inflight)

    def settled(self) -> bool:
        """True when every key is acked, live or refused (nothing queued or waiting)."""
        return all(s.state in (SubState.ACKED, SubState.LIVE, SubState.REFUSED)
                   for s in self._subs.values())

    # -- requests --------------------------------------------------------------------
    def pop_request(self, now_ns: int) -> Request | None:
        """The next request (batched): the oldest queued key of the most urgent channel
        (instrument, book, trade, ohlc), with the keys queued after it that share its
        method, channel and interval. None when nothing is queued."""
        if not self._queue:
            return None
        first = min(self._queue, key=lambda k: _PRIORITY[k.channel])
        unsub = self._subs[first].state is SubState.UNSUB_QUEUED
        limit = 1 if first.symbol is None else self._batch
        keys: list[SubKey] = []
        for key in self._queue:
            if (key.channel == first.channel and key.interval == first.interval
                    and (self._subs[key].state is SubState.UNSUB_QUEUED) == unsub):
                keys.append(key)
                if len(keys) == limit:
                    break
        req_id = self.new_req_id()
        for key in keys:
            del self._queue[key]
            sub = self._subs[key]
            sub.state = SubState.UNSUBSCRIBING if unsub else SubState.REQUESTED
            sub.req_id = req_id
        self._inflight[req_id] = _InFlight(req_id, unsub, now_ns, {k.symbol: k for k in keys})
        self._deadline(now_ns + self._ack_timeout_ns)
        method = "unsubscribe" if unsub else "subscribe"
        params = self._params(first, [k.symbol for k in keys if k.symbol is not None], unsub)
        return Request(req_id, method, tuple(keys), _encode(_Req(method, params, req_id)))

    def _params(self, key: SubKey, symbols: list[str], unsub: bool) -> _Params:
        ch = key.channel
        if ch == BOOK:
            return _Params(ch, symbols, depth=self.depth, snapshot=None if unsub else True)
        if ch == TRADE:
            return _Params(ch, symbols, snapshot=None if unsub else False)
        if ch == OHLC:
            return _Params(ch, symbols, interval=key.interval, snapshot=None if unsub else True)
        return _Params(ch, snapshot=None if unsub else True)

    # -- answers ---------------------------------------------------------------------
    def on_ack(self, ack: Ack, now_ns: int) -> list[AckOutcome]:
        """Match a subscribe/unsubscribe ack to its keys and settle them."""
        unsub = ack.method == "unsubscribe"
        keys = self._match(ack, unsub)
        if not keys:
            return [AckOutcome(AckKind.UNMATCHED, None, ack.error or "", ack.req_id)]
        ok = ack.success or (not unsub and _already_subscribed(ack.error))
        return [self._settle(k, ok, ack.error or "", ack.req_id, unsub, now_ns) for k in keys]

    def on_request_error(self, req_id: int, error: str, now_ns: int) -> list[AckOutcome]:
        """An error frame that names a request in flight: a refusal of its unacked keys."""
        req = self._inflight.pop(req_id, None)
        if req is None:
            return []
        return [self._settle(k, False, error, req_id, req.unsubscribe, now_ns)
                for k in req.unacked.values()]

    def _match(self, ack: Ack, unsub: bool) -> list[SubKey]:
        res = ack.result
        symbol = res.symbol if res is not None and res.symbol is not None else ack.symbol
        channel = res.channel if res is not None and res.channel else None
        req = self._inflight.get(ack.req_id) if ack.req_id is not None else None
        if req is not None and req.unsubscribe == unsub:
            keys = self._take(req, symbol)
            if keys:
                return keys
        if channel is not None:  # by name: the ack says what it answers
            interval = res.interval if res is not None and channel == OHLC else None
            key = SubKey(channel, symbol, interval)
            if key not in self._subs:
                return []
            for r in list(self._inflight.values()):
                if r.unsubscribe == unsub and r.unacked.get(symbol) == key:
                    self._take(r, symbol)
            return [key]
        for r in self._inflight.values():  # oldest request holding that symbol
            if r.unsubscribe == unsub and symbol is not None and symbol in r.unacked:
                return self._take(r, symbol)
        if symbol is None:
            waiting = [r for r in self._inflight.values() if r.unsubscribe == unsub]
            if len(waiting) == 1:
                return self._take(waiting[0], None)
        return []

    def _take(self, req: _InFlight, symbol: str | None) -> list[SubKey]:
        if symbol is not None or None in req.unacked:
            key = req.unacked.pop(symbol, None)
            keys = [] if key is None else [key]
        else:  # a refusal that names no symbol answers the whole request
            keys = list(req.unacked.values())
            req.unacked.clear()
        if not req.unacked:
            del self._inflight[req.req_id]
        return keys

    def _settle(self, key: SubKey, ok: bool, error: str, req_id: int | None, unsub: bool,
                now_ns: int) -> AckOutcome:
        sub = self._subs.get(key)
        if sub is None:
            return AckOutcome(AckKind.UNMATCHED, key, error, req_id)
        st = sub.state
        if unsub:
            if st not in (SubState.UNSUBSCRIBING, SubState.UNSUB_QUEUED):
                return AckOutcome(AckKind.DUPLICATE, key, error, req_id)
            # Success, or "not found": either way Kraken no longer sends it. Resubscribe.
            sub.state = SubState.PENDING
            self._queue[key] = None
            return AckOutcome(AckKind.UNSUBSCRIBED, key, error, req_id)
        if st not in (SubState.REQUESTED, SubState.PENDING):
            return AckOutcome(AckKind.DUPLICATE, key, error, req_id)
        self._queue.pop(key, None)  # re-queued after a rate limit, answered after all
        if ok:
            sub.state = SubState.ACKED
            sub.acked_ns = now_ns
            sub.error = ""
            if key.channel in SNAPSHOT_CHANNELS:
                self._deadline(now_ns + self._snapshot_limit(sub))
            return AckOutcome(AckKind.SUBSCRIBED, key, error, req_id)
        sub.state = SubState.REFUSED
        sub.error = error
        return AckOutcome(AckKind.REFUSED, key, error, req_id)

    def requeue_unacked(self) -> list[SubKey]:
        """After "Exceeded msg rate": every key still waiting for an ack goes back to
        the head of the queue. The requests stay known, so late acks still match."""
        keys = self._back_to_queue(list(self._inflight.values()))
        return keys

    def expire(self, now_ns: int) -> list[SubKey]:
        """Requests unanswered for the ack timeout: drop them, re-queue their keys."""
        old = [r for r in self._inflight.values()
               if now_ns - r.sent_ns >= self._ack_timeout_ns]
        for r in old:
            del self._inflight[r.req_id]
        return self._back_to_queue(old)

    def _back_to_queue(self, requests: list[_InFlight]) -> list[SubKey]:
        keys: list[SubKey] = []
        for r in requests:
            for key in r.unacked.values():
                sub = self._subs.get(key)
                if sub is None or sub.req_id != r.req_id or sub.state not in _WAITING:
                    continue
                sub.state = (SubState.PENDING if sub.state is SubState.REQUESTED
                             else SubState.UNSUB_QUEUED)
                keys.append(key)
        if keys:
            self._queue = {**dict.fromkeys(keys), **self._queue}
        return keys

    # -- data and liveness -----------------------------------------------------------
    def on_book_data(self, symbol: str, now_ns: int, snapshot: bool) -> bool:
        """A book frame for `symbol`: True if that book is subscribed on this connection."""
        sub = self._books.get(symbol)
        if sub is None:
            return False
        sub.last_data_ns = now_ns
        if snapshot or sub.state is not SubState.LIVE:
            self._first_data(sub, now_ns, snapshot)
        return True

    def on_data(self, key: SubKey, now_ns: int, snapshot: bool) -> bool:
        """Data for `key` arrived: False if the key is unknown on this connection."""
        sub = self._subs.get(key)
        if sub is None:
            return False
        sub.last_data_ns = now_ns
        if sub.state is not SubState.LIVE:
            self._first_data(sub, now_ns, snapshot)
        return True

    def _first_data(self, sub: _Sub, now_ns: int, snapshot: bool) -> None:
        st = sub.state
        needs_snapshot = sub.key.channel in STRICT_SNAPSHOT
        if st is SubState.ACKED and (snapshot or not needs_snapshot):
            sub.state = SubState.LIVE
            sub.misses = 0
        elif st is SubState.REQUESTED and snapshot:  # its ack got lost or went elsewhere
            for r in list(self._inflight.values()):
                if not r.unsubscribe and r.unacked.get(sub.key.symbol) == sub.key:
                    self._take(r, sub.key.symbol)
            sub.state = SubState.LIVE
            sub.acked_ns = now_ns
            sub.misses = 0
        elif st is SubState.LIVE:
            sub.misses = 0

    def _snapshot_limit(self, sub: _Sub) -> int:
        return self._snapshot_ns << min(sub.misses, MAX_MISS_DOUBLINGS)

    def check_liveness(self, now_ns: int) -> list[Finding]:
        """Acked keys without first data in time, and silent live books."""
        found: list[Finding] = []
        for sub in self._subs.values():
            if sub.state is SubState.ACKED and sub.key.channel in SNAPSHOT_CHANNELS:
                limit = self._snapshot_limit(sub)
                waited = now_ns - sub.acked_ns
                if waited >= limit:
                    what = "snapshot" if sub.key.channel in STRICT_SNAPSHOT else "data"
                    found.append(Finding(sub.key, f"no {what} within {limit / NS_PER_S:g} s "
                                                  "of the ack", waited))
            elif sub.state is SubState.LIVE and sub.key.channel == BOOK:
                silent = now_ns - sub.last_data_ns
                if silent >= self._silence_ns:
                    found.append(Finding(sub.key, f"silent for {silent / NS_PER_S:.1f} s",
                                         silent))
        return found

    def resubscribe(self, key: SubKey, *, missed: bool = False) -> bool:
        """Queue unsubscribe-then-subscribe for an acked or live key (False otherwise:
        a key already on its way to a fresh subscription needs nothing more).
        `missed`: it went stale while still waiting for its first data, so its next
        snapshot timeout doubles (a silent live book starts again from the base)."""
        sub = self._subs.get(key)
        if sub is None or sub.state not in _SUBSCRIBED_STATES:
            return False
        if missed and sub.state is SubState.ACKED:
            sub.misses += 1
        sub.state = SubState.UNSUB_QUEUED
        self._queue[key] = None
        return True

    def next_deadline(self) -> int | None:
        """The earliest time at which `expire` or `check_liveness` can find something."""
        best: int | None = None
        for r in self._inflight.values():
            t = r.sent_ns + self._ack_timeout_ns
            best = t if best is None or t < best else best
        for sub in self._subs.values():
            if sub.state is SubState.ACKED and sub.key.channel in SNAPSHOT_CHANNELS:
                t = sub.acked_ns + self._snapshot_limit(sub)
            elif sub.state is SubState.LIVE and sub.key.channel == BOOK:
                t = sub.last_data_ns + self._silence_ns
            else:
                continue
            best = t if best is None or t < best else best
        return best

    def take_new_deadline(self) -> int | None:
        """The earliest deadline created since the last call (acks, requests sent).

        Data only ever moves deadlines later, so a caller that keeps its wake-up at or
        before every deadline only needs this after acks and sends.
        """
        t, self._new_deadline = self._new_deadline, None
        return t

    def _deadline(self, t: int) -> None:
        if self._new_deadline is None or t < self._new_deadline:
            self._new_deadline = t


class Pacer:
    """A token bucket in its GCRA form (integer ns, driven by `now_ns`).

    One token every ``interval = ceil(1e9 / rate_per_s)`` ns, at most `burst` saved up.
    With the default ``burst=1`` requests are at least `interval` apart, so any one
    second (half-open window) holds at most ``rate_per_s`` requests: 10/s by default,
    half of the 20/s nautilus_trader uses and under the ~15 quick subscribes after
    which Kraken was seen answering "Exceeded msg rate". `hold` pauses it (after a
    rate-limit error).
    """

    def __init__(self, rate_per_s: float, burst: int = 1) -> None:
        if not rate_per_s > 0:
            raise ValueError(f"rate_per_s must be > 0, got {rate_per_s}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self.interval_ns = math.ceil(NS_PER_S / rate_per_s)
        self.burst = burst
        self._tat: int | None = None  # theoretical arrival time of the next request
        self._hold_until = 0

    def ready_at(self) -> int:
        """The earliest time `try_take` can succeed."""
        t = self._hold_until
        if self._tat is not None:
            t = max(t, self._tat - (self.burst - 1) * self.interval_ns)
        return t

    def try_take(self, now_ns: int) -> bool:
        if now_ns < self.ready_at():
            return False
        tat = self._tat
        self._tat = (now_ns if tat is None or tat < now_ns else tat) + self.interval_ns
        return True

    def hold(self, until_ns: int) -> None:
        """No request before `until_ns`."""
        self._hold_until = max(self._hold_until, until_ns)

    @property
    def held_until(self) -> int:
        return self._hold_until

    def reset(self) -> None:
        """A new connection: Kraken's rate counter is per connection."""
        self._tat = None
        self._hold_until = 0
