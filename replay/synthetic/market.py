"""A realistic, reproducible synthetic Kraken v2 market: recordings and a live source.

Deterministic from the seed (`random.Random(seed)`): same arguments, same bytes. Uses:
`python -m replay.synthetic ... --out PATH` writes a recording (DESIGN.md section 3;
`.gz` when PATH ends so; see `--help`), and `SyntheticSource` is a `replay.source.Source`
for the replay server (each stream plays its own copy of the market, snapshots first).

Theory of operation
-------------------
Per pair there is a *true* book, a `bookd.book.Book` kept `EXTRA` levels deeper than
the subscribed depth D, and a *client* `Book` at depth D that receives exactly the
frames we send. Every change to the true book goes through `SyntheticMarket._set`,
which decides what Kraken sends (PROTOCOL.md 2.3): a change at index < D is sent (qty
0 for a delete); a delete at index < D also sends the *refill*, the level now at index
D-1 (it came up from below the depth), in the same message; an insert at index < D
pushes the level at D-1 out with no delete; changes below the depth are not sent
(later refills carry their current qty).

A book message applies 1-4 operations (mostly 1; ~1.9 levels per message), usually on
one side: modify a visible level, delete one (~24% of the levels sent are removals), or
insert one between two visible levels or inside the spread, plus the effect of the
trades since the last message; a random-walk "fair" price pulls the book along. The
true book is then topped up below the depth. The level lists are shuffled (a price
that repeats keeps its order: delete, refill, insert; `shuffle=False` keeps the order
in which the changes happened, as Kraken sends them), the message is applied to the
client Book and *its* checksum goes into the frame: exactly what a correct client
computes. `check=True` also compares the client book with the true top D every time.

Numbers are rendered from integer ticks with exactly the precision's decimals
(`0.00000000` for deletes); timestamps are RFC3339 with microseconds. By default every
tick count stays below 10**15, or is a whole number of units for meme coins (1e9 and
more), so `f"{float(token):.{p}f}"` reproduces every token (float baselines are not
penalised); `extreme=True` adds 19-20-digit quantities, below 2**64 ticks. Trades take
from the best level (the book shows it), candles follow the trades per interval, the
`instrument` snapshot uses Kraken's exponent notation (`"qty_increment":1e-08`), and
rare per-pair status changes are `instrument` updates (`status_prob`, default off).
"""

from __future__ import annotations

import random
from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NamedTuple

import msgspec

from bookd.book import Book
from ingest.config import MINUTES_INTERVAL
from ingest.wire import BookUpdate

__all__ = ["Profile", "PROFILES", "GENERIC_PROFILES", "STATUSES", "SyntheticMarket",
           "SyntheticFrame", "render", "rfc3339"]

EXTRA = 10                  # true-book levels kept below the subscribed depth
U64 = 2**64
SAFE_TICKS = 10**15         # default mode: tick counts stay below (float baselines exact)
START_NS = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z, the default market clock start
STATUSES = ("cancel_only", "post_only", "limit_only", "reduce_only")


class Profile(NamedTuple):
    """How a pair trades: typical price, precisions, typical level qty, tick spacing."""

    price: float            # quote units
    price_precision: int
    qty_precision: int
    qty: float              # median level quantity, base units
    gap: float = 5e-5       # mean spacing of book levels relative to the price
    whole_qty: bool = False  # quantities in whole units (meme coins, 1e9 and more)


PROFILES: dict[str, Profile] = {
    "BTC/USD": Profile(60000.0, 1, 8, 0.4, 2e-5),
    "ETH/USD": Profile(3000.0, 2, 8, 6.0, 4e-5),
    "SOL/USD": Profile(150.0, 2, 8, 40.0, 8e-5),
    "XRP/USD": Profile(0.6, 5, 8, 4000.0, 1.5e-4),
    "MINA/GBP": Profile(0.03, 4, 8, 5000.0, 3e-3),
    "PEPE/USD": Profile(0.0000123, 9, 8, 1.5e9, 1e-4, True),
    "SHIB/USD": Profile(0.0000245, 10, 8, 4e8, 4e-5, True),
}
# for other names (config pairs, SYNn/USD): varied on purpose, by position
GENERIC_PROFILES: tuple[Profile, ...] = (
    PROFILES["BTC/USD"], PROFILES["ETH/USD"], PROFILES["PEPE/USD"], PROFILES["XRP/USD"],
    PROFILES["SHIB/USD"], Profile(25.0, 3, 5, 120.0, 1e-4), PROFILES["SOL/USD"],
    Profile(1.0, 4, 2, 25000.0, 1e-4),
)


_P10 = [10**i for i in range(64)]


def render(ticks: int, precision: int) -> str:
    """`ticks * 10**-precision` with exactly `precision` decimals (Kraken's spelling)."""
    if precision == 0:
        return str(ticks)
    unit = _P10[precision]
    return f"{ticks // unit}.{ticks % unit:0{precision}d}"


def _exp_repr(ticks: int, precision: int) -> str:
    """Instrument-channel number, float repr like Kraken's (`1e-08`, `0.1`, `5e-05`)."""
    v = ticks / 10**precision
    return str(int(v)) if v == int(v) and v >= 1 else repr(v)


_sec_cache: dict[int, str] = {}


def rfc3339(ns: int, digits: int = 6) -> str:
    """RFC3339 UTC with `digits` fractional digits (6: microseconds, 9: ns)."""
    sec, frac = divmod(ns, 10**9)
    head = _sec_cache.get(sec)
    if head is None:
        if len(_sec_cache) > 4096:
            _sec_cache.clear()
        head = _sec_cache[sec] = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{head}.{frac // 10**(9 - digits):0{digits}d}Z"


def _q(s: str) -> str:
    return msgspec.json.encode(s).decode()


class SyntheticFrame(NamedTuple):
    """One frame: channel, symbol ("" if none), the text frame, its exchange time, and
    for book frames the decoded update (ticks), for ohlc frames the interval."""

    channel: str
    symbol: str
    frame: bytes
    ts_ns: int
    update: BookUpdate | None = None
    interval: int = 0


class _Candle:
    __slots__ = ("begin", "open", "high", "low", "close", "volume", "pq", "trades")

    def __init__(self, begin: int, price: int) -> None:
        self.begin = begin
        self.open = self.high = self.low = self.close = price
        self.volume = self.pq = self.trades = 0


class _Pair:
    __slots__ = ("symbol", "pp", "qp", "profile", "true", "client", "fair",
                 "fair0", "gap", "trade_id", "candles", "status", "last_ts", "symq",
                 "qty_med", "pending")

    def __init__(self, symbol: str, profile: Profile, pp: int, qp: int, depth: int) -> None:
        self.symbol = symbol
        self.symq = _q(symbol)
        self.pp, self.qp, self.profile = pp, qp, profile
        self.true = Book(symbol, depth + EXTRA, pp, qp)
        self.client = Book(symbol, depth, pp, qp)
        self.trade_id = 0
        self.candles: dict[int, _Candle] = {}
        self.status = "online"
        self.last_ts = ""
        self.pending: list[tuple[bool, int, int]] = []  # (bid side, price, qty) from trades


class SyntheticMarket:
    """The generator. `next_frame()` -> (channel, symbol, frame bytes); see the module doc.

    `pairs`: symbol names. `precisions` overrides `{symbol: (price, qty)}`; otherwise a
    known pair's profile (`PROFILES`) or a generic one by position decides. `rate` is
    the total book messages per second (the market clock advances 1e9/rate ns per book
    message unless `next_event(now_ns)` is given the time); `trade_ratio` trades per
    book message; `intervals` OHLC intervals in minutes; `status_prob` the chance per
    book message of a pair status change (instrument update); `shuffle` see the module
    doc; `check` compares client and true books after every message (tests).
    """

    def __init__(self, pairs: Sequence[str], depth: int, seed: int,
                 precisions: dict[str, tuple[int, int]] | None = None, extreme: bool = False,
                 *, rate: float = 100.0, trade_ratio: float = 0.05,
                 intervals: Sequence[int] = (1,), status_prob: float = 0.0,
                 shuffle: bool = True, start_ns: int = START_NS, check: bool = False) -> None:
        if not pairs or len(set(pairs)) != len(pairs):
            raise ValueError("pairs must be a non-empty list without repeats")
        for sym in pairs:
            base, _, quote = sym.partition("/")
            if not base or not quote or "/" in quote or '"' in sym or "\\" in sym:
                raise ValueError(f"pair {sym!r} is not BASE/QUOTE")
        if depth < 1:
            raise ValueError("depth must be >= 1")
        bad = [i for i in intervals if i not in MINUTES_INTERVAL]
        if bad:
            raise ValueError(f"unknown OHLC interval(s) {bad}; allowed minutes: "
                             f"{sorted(MINUTES_INTERVAL)}")
        self.depth = depth
        self.seed = seed
        self.extreme = extreme
        self.trade_ratio = trade_ratio
        self.intervals = tuple(intervals)
        self.status_prob = status_prob
        self.shuffle = shuffle
        self.check = check
        self.now_ns = start_ns
        self.set_rate(rate)
        self.rng = random.Random(seed)
        self.connection_id = self.rng.getrandbits(64) | (1 << 63)
        self._queue: deque[SyntheticFrame] = deque()
        self.pairs: list[_Pair] = []
        precisions = precisions or {}
        for i, sym in enumerate(pairs):
            prof = PROFILES.get(sym) or GENERIC_PROFILES[i % len(GENERIC_PROFILES)]
            pp, qp = precisions.get(sym, (prof.price_precision, prof.qty_precision))
            self.pairs.append(self._new_pair(sym, prof, pp, qp))
        self.by_symbol = {p.symbol: p for p in self.pairs}
        w = [self.rng.lognormvariate(0, 0.5) for _ in self.pairs]  # busier and quieter pairs
        total = sum(w)
        acc = 0.0
        self._cum = []
        for x in w:
            acc += x / total
            self._cum.append(acc)
        self.counts = {"book": 0, "levels": 0, "removals": 0, "refills": 0, "pushouts": 0,
                       "trade": 0, "ohlc": 0, "instrument": 0}

    # -- set up ------------------------------------------------------------------------
    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(p.symbol for p in self.pairs)

    @property
    def precisions(self) -> dict[str, tuple[int, int]]:
        return {p.symbol: (p.pp, p.qp) for p in self.pairs}

    def set_rate(self, per_s: float) -> None:
        if not per_s > 0:
            raise ValueError(f"rate must be > 0, got {per_s}")
        self.rate = float(per_s)
        self._dt = max(1, round(1e9 / self.rate))

    def _new_pair(self, sym: str, prof: Profile, pp: int, qp: int) -> _Pair:
        rng = self.rng
        pr = _Pair(sym, prof, pp, qp, self.depth)
        n = self.depth + EXTRA
        fair = prof.price * 10**pp * rng.uniform(0.8, 1.25)
        gap = max(1.0, fair * prof.gap)
        fair = max(fair, 8.0 * gap * n)  # deep bids stay well above zero
        pr.fair = pr.fair0 = fair
        pr.gap = gap
        pr.qty_med = max(1.0, prof.qty * 10**qp)
        mid = int(fair)
        half = 1 + int(rng.expovariate(1 / gap) / 2)
        bids, asks = [], []
        p = mid - half + 1
        for _ in range(n):
            p -= self._step(pr)
            if p <= 0:
                break
            bids.append((p, self._qty(pr)))
        p = mid + half - 1
        for _ in range(n):
            p += self._step(pr)
            asks.append((p, self._qty(pr)))
        pr.true.apply(True, bids, asks)
        pr.client.apply(True, bids[:self.depth], asks[:self.depth])
        pr.last_ts = rfc3339(self.now_ns)
        pr.trade_id = rng.randrange(10**6, 10**8)
        return pr

    def _step(self, pr: _Pair) -> int:
        return 1 + int(self.rng.expovariate(1 / pr.gap))

    def _qty(self, pr: _Pair, scale: float | None = None) -> int:
        """A level quantity in ticks (a fresh one, or `scale` ticks perturbed)."""
        rng = self.rng
        qp = pr.qp
        if self.extreme and rng.random() < (0.5 if pr.profile.whole_qty else 0.08):
            return rng.randrange(10**18, U64)  # 19-20 digits, below 2**64 ticks
        base = scale if scale is not None else pr.qty_med
        q = base * rng.lognormvariate(0, 0.45 if scale is not None else 1.1)
        if pr.profile.whole_qty:
            unit = 10**qp
            return min(max(1, round(q / unit)), 10**11 - 1, (U64 - 1) // unit) * unit
        q = min(max(1, int(q)), SAFE_TICKS - 1)
        if scale is None and qp > 2 and rng.random() < 0.35:  # a round quantity
            unit = 10 ** rng.randint(qp // 2, qp)
            q = max(unit, q // unit * unit)
        return q

    def _new_qty(self, pr: _Pair, old: int) -> int:
        """A different quantity for a level: mostly near the old one, sometimes fresh."""
        for _ in range(4):
            q = self._qty(pr, old if self.rng.random() < 0.6 else None)
            if q != old:
                return q
        step = 10**pr.qp if pr.profile.whole_qty and old % 10**pr.qp == 0 else 1
        return old - step if old > step else old + step

    # -- the true book and what Kraken sends ---------------------------------------------
    def _set(self, pr: _Pair, bid: bool, price: int, qty: int, out: list) -> None:
        """Change the true book; append to `out` what the subscribed client is sent."""
        t = pr.true
        keys = t.bid_keys if bid else t.ask_keys
        k = -price if bid else price
        i = bisect_left(keys, k)
        exists = i < len(keys) and keys[i] == k
        if not qty and not exists:
            return
        if bid:
            t.apply(False, [(price, qty)], ())
        else:
            t.apply(False, (), [(price, qty)])
        d = self.depth
        if i >= d:
            return
        out.append((price, qty))
        keys = t.bid_keys if bid else t.ask_keys
        if not qty:
            self.counts["removals"] += 1
            if len(keys) >= d:  # the refill: the level that came up to the bottom
                k2 = keys[d - 1]
                out.append((-k2 if bid else k2,
                            (t.bid_qtys if bid else t.ask_qtys)[d - 1]))
                self.counts["refills"] += 1
        elif not exists and len(keys) > d:
            self.counts["pushouts"] += 1

    def _level(self, pr: _Pair, bid: bool, i: int) -> tuple[int, int]:
        t = pr.true
        if bid:
            return -t.bid_keys[i], t.bid_qtys[i]
        return t.ask_keys[i], t.ask_qtys[i]

    def _visible_index(self, pr: _Pair, bid: bool) -> int:
        n = min(self.depth, len(pr.true.bid_keys if bid else pr.true.ask_keys))
        return min(n - 1, int(n * self.rng.random() ** 2))  # busier near the top

    def _op(self, pr: _Pair, bid: bool, out: list) -> None:
        rng = self.rng
        t = pr.true
        keys = t.bid_keys if bid else t.ask_keys
        if not keys:
            return
        best_bid = -t.bid_keys[0] if t.bid_keys else 0
        best_ask = t.ask_keys[0] if t.ask_keys else U64
        best = best_bid if bid else best_ask
        dist = (pr.fair - best) if bid else (best - pr.fair)  # > 0: best is behind fair
        if dist < -pr.gap and len(keys) > 1 and rng.random() < 0.7:
            self._set(pr, bid, best, 0, out)  # fair moved through it: taken out
            return
        r = rng.random()
        toward = dist > 2 * pr.gap and r < 0.5  # fair moved away: quote towards it
        if toward:
            r = 1.0
        if r < 0.40:  # modify
            i = self._visible_index(pr, bid)
            p, q = self._level(pr, bid, i)
            self._set(pr, bid, p, self._new_qty(pr, q), out)
        elif r < 0.72:  # delete
            self._set(pr, bid, self._level(pr, bid, self._visible_index(pr, bid))[0], 0, out)
        else:  # insert: between two visible levels, or inside the spread
            i = 0 if toward or rng.random() < 0.3 else self._visible_index(pr, bid)
            if i == 0:
                inner = best_ask - 1 if bid else best_bid + 1
                if bid:
                    lo, hi = best + 1, min(inner, int(pr.fair))
                else:
                    lo, hi = max(inner, int(pr.fair) + 1), best - 1
            else:
                a, b = self._level(pr, bid, i - 1)[0], self._level(pr, bid, i)[0]
                lo, hi = (b + 1, a - 1) if bid else (a + 1, b - 1)
            if lo > hi:  # no room there: modify that level instead
                p, q = self._level(pr, bid, i)
                self._set(pr, bid, p, self._new_qty(pr, q), out)
                return
            self._set(pr, bid, rng.randint(lo, hi), self._qty(pr), out)

    def _top_up(self, pr: _Pair, bids: list, asks: list) -> None:
        """Keep the true book EXTRA levels deeper than the depth, plus quiet churn there."""
        t = pr.true
        want = self.depth + EXTRA
        for bid, out in ((True, bids), (False, asks)):
            keys = t.bid_keys if bid else t.ask_keys
            while len(keys) < want:
                if keys:
                    last = -keys[-1] if bid else keys[-1]
                elif bid:  # an empty side (cannot happen in practice): start from fair
                    last = min(int(pr.fair), t.ask_keys[0] if t.ask_keys else U64)
                else:
                    last = max(int(pr.fair), -t.bid_keys[0] if t.bid_keys else 0)
                p = last - self._step(pr) if bid else last + self._step(pr)
                if p <= 0:
                    break
                self._set(pr, bid, p, self._qty(pr), out)
                keys = t.bid_keys if bid else t.ask_keys
        if self.rng.random() < 0.3:  # quiet churn below the depth
            bid = self.rng.random() < 0.5
            keys = t.bid_keys if bid else t.ask_keys
            if len(keys) > self.depth:
                p, q = self._level(pr, bid, self.rng.randrange(self.depth, len(keys)))
                self._set(pr, bid, p, self._new_qty(pr, q), bids if bid else asks)

    def _shuffle(self, levels: list) -> list:
        if len(levels) < 2:
            return levels
        rnd = self.rng.random
        key: dict[int, float] = {}
        for p, _ in levels:
            if p not in key:
                key[p] = rnd()
        order = sorted(range(len(levels)), key=lambda j: (key[levels[j][0]], j))
        return [levels[j] for j in order]

    # -- frames --------------------------------------------------------------------------
    def _book_frame(self, pr: _Pair, snapshot: bool, bids: list, asks: list, crc: int,
                    ts: str) -> bytes:
        pp, qp = pr.pp, pr.qp
        b = ",".join([f'{{"price":{render(p, pp)},"qty":{render(q, qp)}}}' for p, q in bids])
        a = ",".join([f'{{"price":{render(p, pp)},"qty":{render(q, qp)}}}' for p, q in asks])
        kind = "snapshot" if snapshot else "update"
        return (f'{{"channel":"book","type":"{kind}","data":[{{"symbol":{pr.symq},'
                f'"bids":[{b}],"asks":[{a}],"checksum":{crc},"timestamp":"{ts}"}}]}}').encode()

    def snapshot_frame(self, symbol: str) -> bytes:
        """The current book of `symbol` at the subscribed depth, with its checksum."""
        return self.snapshot_event(symbol).frame

    def snapshot_event(self, symbol: str) -> SyntheticFrame:
        pr = self.by_symbol[symbol]
        bids, asks = pr.client.bids(), pr.client.asks()
        crc = pr.client.checksum()
        upd = BookUpdate(symbol, True, bids, asks, crc, pr.last_ts)
        return SyntheticFrame("book", symbol, self._book_frame(pr, True, bids, asks, crc,
                                                               pr.last_ts), self.now_ns, upd)

    def instrument_frame(self, snapshot: bool = True, only: _Pair | None = None) -> bytes:
        """The instrument snapshot listing every pair (or an update for one pair)."""
        pairs = [only] if only else self.pairs
        assets: list[str] = []
        if snapshot:
            for pr in self.pairs:
                for a in pr.symbol.split("/"):
                    if a not in assets:
                        assets.append(a)
        aj = ",".join(f'{{"id":{_q(a)},"status":"enabled","precision":10,'
                      f'"precision_display":5,"borrowable":false,"collateral_value":0.0,'
                      f'"margin_rate":0.02}}' for a in assets)
        pj = ",".join(self._pair_json(pr) for pr in pairs)
        kind = "snapshot" if snapshot else "update"
        return (f'{{"channel":"instrument","type":"{kind}","data":{{"assets":[{aj}],'
                f'"pairs":[{pj}]}}}}').encode()

    def _pair_json(self, pr: _Pair) -> str:
        base, quote = pr.symbol.split("/")
        inc = _exp_repr(1, pr.pp)
        unit = 10**pr.qp
        digits = str(max(1, int(pr.qty_med / 50)))
        qmin = min(int(digits[0]) * 10 ** (len(digits) - 1), 1000 * unit)  # 1 digit, like 5e-05
        return (f'{{"symbol":{pr.symq},"base":{_q(base)},"quote":{_q(quote)},'
                f'"status":"{pr.status}","qty_precision":{pr.qp},'
                f'"qty_increment":{_exp_repr(1, pr.qp)},"price_precision":{pr.pp},'
                f'"cost_precision":5,"marginable":false,"has_index":true,"cost_min":0.5,'
                f'"tick_size":{inc},"price_increment":{inc},'
                f'"qty_min":{_exp_repr(qmin, pr.qp)}}}')

    # -- the stream ------------------------------------------------------------------------
    def next_frame(self) -> tuple[str, str, bytes]:
        """The next frame of the market: (channel, symbol, frame bytes)."""
        f = self.next_event()
        return f.channel, f.symbol, f.frame

    @property
    def pending(self) -> int:
        """Frames of the current step not handed out yet (the clock moves on at 0)."""
        return len(self._queue)

    def next_event(self, now_ns: int | None = None) -> SyntheticFrame:
        """The next frame with its details. `now_ns` sets the market clock (live use);
        without it the clock advances 1e9/rate ns per book message."""
        if not self._queue:
            self.now_ns = now_ns if now_ns is not None else self.now_ns + self._dt
            self._tick()
        return self._queue.popleft()

    def _tick(self) -> None:
        rng = self.rng
        i = bisect_left(self._cum, rng.random())
        pr = self.pairs[min(i, len(self.pairs) - 1)]
        if rng.random() < self.trade_ratio:
            self._trade(pr)
        if self.status_prob and rng.random() < self.status_prob:
            sp = self.pairs[rng.randrange(len(self.pairs))]
            sp.status = rng.choice(STATUSES) if sp.status == "online" else "online"
            self.counts["instrument"] += 1
            self._queue.append(SyntheticFrame("instrument", sp.symbol, self.instrument_frame(
                False, sp), self.now_ns))
        self._book_message(pr)

    def _book_message(self, pr: _Pair) -> None:
        rng = self.rng
        g = pr.gap
        pr.fair += rng.gauss(0, 0.35 * g)
        if not 0.5 * pr.fair0 < pr.fair < 2 * pr.fair0:
            pr.fair = 2 * (pr.fair0 * (0.5 if pr.fair <= 0.5 * pr.fair0 else 2)) - pr.fair
        bids: list = []
        asks: list = []
        for bid, p, q in pr.pending:  # what the trades did to the best level
            self._set(pr, bid, p, q, bids if bid else asks)
        pr.pending.clear()
        r = rng.random()
        nops = 1 if r < 0.70 else 2 if r < 0.93 else 3 if r < 0.99 else 4
        side = rng.random() < 0.5
        both = rng.random() < 0.06
        for k in range(nops):
            bid = (not side) if both and k % 2 else side
            self._op(pr, bid, bids if bid else asks)
        self._top_up(pr, bids, asks)
        if not bids and not asks and (pr.true.bid_keys if side else pr.true.ask_keys):
            p, q = self._level(pr, side, self._visible_index(pr, side))
            self._set(pr, side, p, self._new_qty(pr, q), bids if side else asks)
        if self.shuffle:
            bids = self._shuffle(bids)
            asks = self._shuffle(asks)
        crc = pr.client.apply(False, bids, asks)
        if self.check:
            self._check(pr)
        ts = rfc3339(self.now_ns)
        pr.last_ts = ts
        c = self.counts
        c["book"] += 1
        c["levels"] += len(bids) + len(asks)
        upd = BookUpdate(pr.symbol, False, bids, asks, crc, ts)
        self._queue.append(SyntheticFrame("book", pr.symbol, self._book_frame(
            pr, False, bids, asks, crc, ts), self.now_ns, upd))

    def _check(self, pr: _Pair) -> None:
        d = self.depth
        want_b = [(-k, q) for k, q in zip(pr.true.bid_keys[:d], pr.true.bid_qtys[:d],
                                           strict=True)]
        want_a = list(zip(pr.true.ask_keys[:d], pr.true.ask_qtys[:d], strict=True))
        if pr.client.bids() != want_b or pr.client.asks() != want_a:
            raise AssertionError(f"{pr.symbol}: client book diverged from the true book")

    def _trade(self, pr: _Pair) -> None:
        rng = self.rng
        buy = rng.random() < 0.5
        t = pr.true
        if buy and t.ask_keys:
            price, lvl = t.ask_keys[0], t.ask_qtys[0]
        elif t.bid_keys:
            buy, price, lvl = False, -t.bid_keys[0], t.bid_qtys[0]
        else:
            return
        full = rng.random() < 0.3
        qty = lvl if full or lvl < 2 else max(1, int(lvl * rng.uniform(0.02, 0.9)))
        if pr.profile.whole_qty and not self.extreme and not full:
            unit = 10**pr.qp
            qty = max(unit, qty // unit * unit) if lvl >= unit else lvl
        pr.pending.append((not buy, price, lvl - qty))
        pr.trade_id += 1
        ts = rfc3339(self.now_ns)
        ord_type = "market" if rng.random() < 0.6 else "limit"
        frame = (f'{{"channel":"trade","type":"update","data":[{{"symbol":{pr.symq},'
                 f'"side":"{"buy" if buy else "sell"}","price":{render(price, pr.pp)},'
                 f'"qty":{render(qty, pr.qp)},"ord_type":"{ord_type}",'
                 f'"trade_id":{pr.trade_id},"timestamp":"{ts}"}}]}}').encode()
        self.counts["trade"] += 1
        self._queue.append(SyntheticFrame("trade", pr.symbol, frame, self.now_ns))
        for minutes in self.intervals:
            self._candle(pr, minutes, price, qty)

    def _candle(self, pr: _Pair, minutes: int, price: int, qty: int) -> None:
        span = minutes * 60 * 10**9
        begin = self.now_ns - self.now_ns % span
        c = pr.candles.get(minutes)
        if c is None or c.begin != begin:
            c = pr.candles[minutes] = _Candle(begin, price)
        c.high = max(c.high, price)
        c.low = min(c.low, price)
        c.close = price
        c.volume += qty
        c.pq += price * qty
        c.trades += 1
        vwap = (2 * c.pq + c.volume) // (2 * c.volume)  # rounded half up, price ticks
        pp = pr.pp
        frame = (f'{{"channel":"ohlc","type":"update","timestamp":"{rfc3339(self.now_ns, 9)}",'
                 f'"data":[{{"symbol":{pr.symq},"open":{render(c.open, pp)},'
                 f'"high":{render(c.high, pp)},"low":{render(c.low, pp)},'
                 f'"close":{render(c.close, pp)},"trades":{c.trades},'
                 f'"volume":{render(c.volume, pr.qp)},"vwap":{render(vwap, pp)},'
                 f'"interval_begin":"{rfc3339(begin, 9)}","interval":{minutes},'
                 f'"timestamp":"{rfc3339(begin + span)}"}}]}}').encode()
        self.counts["ohlc"] += 1
        self._queue.append(SyntheticFrame("ohlc", pr.symbol, frame, self.now_ns,
                                          interval=minutes))

    # -- session frames (recordings) ---------------------------------------------------------
    def status_frame(self) -> bytes:
        return (b'{"channel":"status","type":"update","data":[{"version":"2.0.10",'
                b'"system":"online","api_version":"v2","connection_id":%d}]}'
                % self.connection_id)

    def ack_frames(self, req_ids: dict[str, int] | None = None) -> list[bytes]:
        """Subscribe acks as Kraken sends them: instrument, then one per symbol and channel."""
        ids = req_ids or {}
        t_in = rfc3339(self.now_ns)
        t_out = rfc3339(self.now_ns + 41_000)

        def ack(result: str, rid: str) -> bytes:
            r = f',"req_id":{ids[rid]}' if rid in ids else ""
            return (f'{{"method":"subscribe"{r},"result":{{{result}}},"success":true,'
                    f'"time_in":"{t_in}","time_out":"{t_out}"}}').encode()

        out = [ack('"channel":"instrument","snapshot":true,"warnings":["tick_size is '
                   'deprecated, use price_increment"]', "instrument")]
        for s in self.symbols:
            out.append(ack(f'"channel":"book","depth":{self.depth},"snapshot":true,'
                           f'"symbol":{_q(s)}', "book"))
        for s in self.symbols:
            out.append(ack(f'"channel":"trade","snapshot":false,"symbol":{_q(s)}', "trade"))
        for m in self.intervals:
            for s in self.symbols:
                out.append(ack(f'"channel":"ohlc","interval":{m},"snapshot":false,"symbol":'
                               f'{_q(s)},"warnings":["timestamp is deprecated, use '
                               f'interval_begin"]', f"ohlc{m}"))
        return out
