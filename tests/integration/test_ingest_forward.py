"""IngestApp's forward path (ingest/app.py `on_text`) against a real PULL where bookd
would be: frames of one socket read reach bookd in order, with per-pair sequence numbers,
as one batch per read (or full batches), except that the first frame of a read that
follows an idle gap goes at once, alone.

No WebSocket: picows' listener calls `on_text(conn_id, payload, last)`; the test does the
same. The session's liveness bookkeeping is stubbed to "subscribed", and the app's
monotonic clock is a fake one the test moves (no timing in tests).
"""

from __future__ import annotations

import shutil
import time

import pytest
import zmq

from ingest import app as app_mod
from ingest.app import IngestApp
from ingest.config import load_config
from ingest.messages import FRAME, inner_messages, unpack_header
from tests.integration.harness import make_config

PAIRS = ["BTC/USD", "ETH/USD"]


def _frame(pair: str, i: int, kind: str = "update") -> bytes:
    return (b'{"channel":"book","type":"%s","data":[{"symbol":"%s","bids":[{"price":%d.1,'
            b'"qty":0.5}],"asks":[],"checksum":%d,"timestamp":"2023-10-06T17:35:55.440295Z"}]}'
            % (kind.encode(), pair.encode(), 60000 + i, i))


class FakeClock:
    def __init__(self) -> None:
        self.ns = 10**12

    def __call__(self) -> int:
        return self.ns


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr(app_mod, "_mono_ns", c)
    return c


@pytest.fixture
def app_and_pull(tmp_path, clock):
    cfg = load_config(make_config(tmp_path, PAIRS))
    app = IngestApp(cfg, "ws://127.0.0.1:9/v2")
    pull = app.ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(cfg.ipc("bookd"))
    app.conn_id = 7
    app._on_book_frame = lambda symbol, snapshot, now: True  # every book is subscribed
    time.sleep(0.1)  # the PUSH connects to the bound PULL
    try:
        yield app, pull
    finally:
        pull.close(0)
        app.close()
        shutil.rmtree(cfg.run_path, ignore_errors=True)


def _read(app: IngestApp, frames: list[bytes]) -> None:
    """What picows does for one socket read holding `frames`."""
    for k, f in enumerate(frames):
        app.on_text(7, f, k == len(frames) - 1)


def _received(pull: zmq.Socket, n_frames: int) -> list[list[tuple[int, int, bytes]]]:
    """The ZMQ messages bookd gets, each as its [(pair_index, seq, payload)]."""
    out: list[list[tuple[int, int, bytes]]] = []
    got = 0
    while got < n_frames:
        assert pull.poll(5000), f"only {got} of {n_frames} frames arrived"
        batch = []
        for m in inner_messages(pull.recv()):
            kind, pair, conn, seq, _ = unpack_header(m)
            assert (kind, conn) == (FRAME, 7)
            batch.append((pair, seq, m[32:]))
        got += len(batch)
        out.append(batch)
    assert not pull.poll(100), "more messages than frames"
    return out


def test_a_read_after_an_idle_gap_sends_its_first_frame_at_once(app_and_pull):
    app, pull = app_and_pull
    frames = [_frame(PAIRS[i % 2], i) for i in range(10)]
    _read(app, frames)
    batches = _received(pull, 10)
    assert [len(b) for b in batches] == [1, 9]
    flat = [x for b in batches for x in b]
    assert [p for _, _, p in flat] == frames  # bytes as received, in order
    assert [(pair, seq) for pair, seq, _ in flat] == [(i % 2, i // 2 + 1) for i in range(10)]
    assert app.counters["forwarded"] == 10 and app.counters["drops_bookd"] == 0


def test_a_read_soon_after_another_goes_as_one_batch_or_full_ones(app_and_pull, clock):
    app, pull = app_and_pull
    limit = app.bookd_batch.limit
    n = 15 + 2 * limit + 5
    _read(app, [_frame("BTC/USD", i) for i in range(n)])  # the first read: idle before
    assert [len(b) for b in _received(pull, n)] == [1, limit, limit, 19]
    clock.ns += app_mod.IDLE_GAP_NS - 1  # busy: one batch per read, full ones if long
    _read(app, [_frame("BTC/USD", n + i) for i in range(10)])
    assert [len(b) for b in _received(pull, 10)] == [10]
    clock.ns += app_mod.IDLE_GAP_NS - 1
    _read(app, [_frame("BTC/USD", n + 10 + i) for i in range(limit + 3)])
    assert [len(b) for b in _received(pull, limit + 3)] == [limit, 3]
    clock.ns += app_mod.IDLE_GAP_NS  # idle again: the first frame at once
    _read(app, [_frame("BTC/USD", n + 13 + limit + i) for i in range(10)])
    assert [len(b) for b in _received(pull, 10)] == [1, 9]
    assert app.seq[0] == n + 23 + limit


def test_non_book_frames_and_unknown_pairs_are_not_forwarded(app_and_pull):
    app, pull = app_and_pull
    _read(app, [_frame("DOGE/USD", 1), _frame("BTC/USD", 2),
                b'{"channel":"heartbeat"}', _frame("BTC/USD", 3, "snapshot")])
    assert [[(p, s) for p, s, _ in b] for b in _received(pull, 2)] == [[(0, 1)], [(0, 2)]]
    assert app.counters["unknown_pair"] == 1
    assert app.counters["ws_frames"] == 4 and app.counters["forwarded"] == 2
