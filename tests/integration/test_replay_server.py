"""The replay server over loopback: protocol shapes, serving, books, faults, control.

Each test starts its own server on a free port (port=0), talks to it with the tiny
picows client of wsclient.py, and stops it. Heartbeats run at 0.1 s so liveness shows
quickly. Waits are bounded by generous timeouts; nothing asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import uvloop

from bookd.book import Book, BookError
from ingest.wire import InstrumentMessage, Status, decode_book, decode_message
from replay.control import ControlError, ReplayControl
from replay.faults import FAULT_TABLE
from replay.recording import RecordingWriter
from replay.server import ReplayServer, run_in_thread
from replay.source import RecordingSource

from .wsclient import ConnectionClosed, WsClient

ROOT = Path(__file__).resolve().parents[2]
VECTORS = Path(os.environ.get("KRAKENFEED_VECTORS", ROOT.parent / "shared" / "kraken" / "vectors"))
CAPTURE = VECTORS / "depthcharge_kraken_minagbp_d25_20260816.ndjson"
PREC = {"MINA/GBP": (4, 8), "MINA/EUR": (4, 8)}
HEARTBEAT = b'{"channel":"heartbeat"}'

pytestmark = pytest.mark.skipif(not CAPTURE.exists(), reason=f"{CAPTURE} not found")


# -------------------------------------------------------------------------------------
# helpers

def run(fn: Callable[[], Any], timeout: float = 15.0) -> Any:
    async def main() -> Any:
        return await asyncio.wait_for(fn(), timeout)
    return uvloop.run(main())


def capture_frames() -> list[bytes]:
    src = RecordingSource.from_path(CAPTURE, price_precision=4, qty_precision=8)
    return [e.frame for e in src.events_list]


@pytest.fixture
def paced(tmp_path: Path) -> Path:
    """Two symbols (the capture, and a copy renamed MINA/EUR), interleaved: frames 0-3
    at once, frames 4-15 after a 400 ms gap, frames 16-29 after another 400 ms gap
    (2 ms apart within a group)."""
    path = tmp_path / "paced.ndjson.gz"
    frames = capture_frames()
    with RecordingWriter(path, symbols=list(PREC), depth=25, precisions=PREC,
                         url="ws://test") as w:
        w.write_frame(0, b'{"method":"subscribe","params":{"channel":"book"}}', tx=True)
        t = 10**12
        for i, f in enumerate(frames):
            t += 400_000_000 if i in (4, 16) else (2_000_000 if i else 0)
            w.write_frame(t, f)
            w.write_frame(t, f.replace(b'"MINA/GBP"', b'"MINA/EUR"'))
    return path


@asynccontextmanager
async def serving(**kw: Any) -> AsyncIterator[ReplayServer]:
    kw.setdefault("recording", CAPTURE)
    if kw["recording"] is None:
        del kw["recording"]
    elif kw["recording"] == CAPTURE:
        kw.setdefault("price_precision", 4)
        kw.setdefault("qty_precision", 8)
    kw.setdefault("port", 0)
    kw.setdefault("heartbeat_s", 0.1)
    kw.setdefault("speed", "max")
    server = ReplayServer(**kw)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def connect(server: ReplayServer) -> WsClient:
    c = await WsClient.connect(server.url)
    status = await c.recv_json()
    assert status["channel"] == "status"
    return c


def sub(symbols: list[str], req_id: int, channel: str = "book", depth: int | None = 25,
        method: str = "subscribe", **params: Any) -> dict:
    p: dict = {"channel": channel, "symbol": symbols, **params}
    if depth is not None and channel == "book":
        p["depth"] = depth
    return {"method": method, "params": p, "req_id": req_id}


def is_book(raw: bytes) -> bool:
    return raw.startswith(b'{"channel":"book"')


async def books(c: WsClient, n: int, timeout: float = 3.0) -> list[bytes]:
    """The next n book frames (other frames are dropped)."""
    out: list[bytes] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(out) < n:
        raw = await c.recv(max(0.0, deadline - loop.time()))
        if is_book(raw):
            out.append(raw)
    return out


async def quiet(c: WsClient, seconds: float) -> list[bytes]:
    """Every frame received within `seconds`, heartbeats included."""
    out: list[bytes] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        try:
            out.append(await c.recv(max(0.001, deadline - loop.time())))
        except (TimeoutError, ConnectionClosed):
            return out


class Verifier:
    """A client's books: apply every frame through the book core, record each verdict."""

    def __init__(self) -> None:
        self.books: dict[str, Book] = {}
        self.verdicts: list[bool] = []

    def feed(self, raw: bytes) -> list[bool]:
        out = []
        for u in decode_book(raw, PREC):
            b = self.books.setdefault(u.symbol, Book(u.symbol, 25, *PREC[u.symbol]))
            try:
                ok = b.apply(u.snapshot, u.bids, u.asks) == u.checksum
            except BookError:
                ok = False
            out.append(ok)
        self.verdicts.extend(out)
        return out


def checksum_of(raw: bytes) -> int:
    return decode_book(raw, PREC)[0].checksum


# -------------------------------------------------------------------------------------
# protocol shapes

def test_status_first_then_acks_one_per_symbol_with_req_id(paced: Path) -> None:
    async def main() -> None:
        async with serving(recording=paced) as server:
            c = await WsClient.connect(server.url)
            first = await c.recv()
            msg = decode_message(first)
            assert isinstance(msg, Status) and msg.data[0].system == "online"
            assert msg.data[0].connection_id > 2**53
            assert first.startswith(b'{"channel":"status","type":"update","data":[{"version":')
            c.send_json(sub(["MINA/GBP", "MINA/EUR"], 42))
            acks = [await c.recv_json(), await c.recv_json()]
            for a, sym in zip(acks, ["MINA/GBP", "MINA/EUR"], strict=True):
                assert a["method"] == "subscribe" and a["success"] is True and a["req_id"] == 42
                assert a["result"] == {"channel": "book", "depth": 25, "snapshot": True,
                                       "symbol": sym}
                assert list(a) == ["method", "result", "success", "time_in", "time_out",
                                   "req_id"]
            c.send_json(sub(["MINA/EUR"], 43, method="unsubscribe"))
            ack, _ = await c.recv_until(lambda m: m.get("method") == "unsubscribe")
            assert ack["result"] == {"channel": "book", "depth": 25, "symbol": "MINA/EUR"}
            assert ack["success"] is True and ack["req_id"] == 43
            await c.close()
    run(main)


def test_refused_depth_and_unknown_symbol() -> None:
    async def main() -> None:
        async with serving() as server:
            c = await connect(server)
            c.send_json(sub(["MINA/GBP"], 5, depth=10))
            refusal = await c.recv_json()
            assert refusal["error"] == "Subscription depth not supported"
            assert refusal["success"] is False and refusal["method"] == "subscribe"
            assert refusal["req_id"] == 5 and "result" not in refusal and "symbol" not in refusal
            c.send_json(sub(["XBT/USD"], 6))
            err = await c.recv_json()
            assert err["error"] == "Currency pair not supported XBT/USD"
            assert err["symbol"] == "XBT/USD" and err["success"] is False and err["req_id"] == 6
            await asyncio.sleep(0.25)                 # the connection stays up: heartbeats
            assert HEARTBEAT in c.pending()
            await c.close()
    run(main)


def test_rate_limit_and_ping_pong() -> None:
    async def main() -> None:
        async with serving() as server:
            c = await connect(server)
            c.send_json({"method": "ping", "req_id": 101})
            pong = await c.recv_json()
            assert pong["method"] == "pong" and pong["req_id"] == 101
            assert "time_in" in pong and "time_out" in pong
            for i in range(15):
                c.send_json(sub(["MINA/GBP"], 200 + i))
            replies = []
            while len(replies) < 15:
                raw = await c.recv()
                if raw != HEARTBEAT and not is_book(raw):
                    replies.append(raw)
            limited = [r for r in replies if r == b'{"Error":"Exceeded msg rate"}']
            assert 3 <= len(limited) <= 6   # 16 requests, burst 10 (+ a token or two refilled)
            assert server.counters["rate_limited"] == len(limited)
            await c.close()
    run(main)


def test_instrument_channel_synthesized_with_precisions() -> None:
    async def main() -> None:
        async with serving() as server:
            c = await connect(server)
            c.send_json({"method": "subscribe", "params": {"channel": "instrument"}, "req_id": 79})
            ack = await c.recv_json()
            assert ack["result"]["channel"] == "instrument" and ack["req_id"] == 79
            raw = await c.recv()
            assert b'"qty_increment":1e-08' in raw and b'"price_increment":0.0001' in raw
            msg = decode_message(raw)
            assert isinstance(msg, InstrumentMessage) and msg.type == "snapshot"
            (pair,) = msg.pairs
            assert (pair.symbol, pair.price_precision, pair.qty_precision) == ("MINA/GBP", 4, 8)
            assert pair.qty_increment == "0.00000001"
            await c.close()
    run(main)


# -------------------------------------------------------------------------------------
# serving

def test_capture_served_verbatim_and_every_checksum_verifies() -> None:
    expected = capture_frames()

    async def main() -> None:
        async with serving() as server:
            c = await connect(server)
            c.send_json(sub(["MINA/GBP"], 1))
            got = await books(c, len(expected))
            assert got == expected                       # byte-identical, in order
            v = Verifier()
            for raw in got:
                v.feed(raw)
            assert v.verdicts == [True] * len(expected)
            # end of the recording: no more data, heartbeats go on
            rest = await quiet(c, 0.3)
            assert HEARTBEAT in rest and not any(is_book(r) for r in rest)
            # a resubscribe after the end gets a fresh snapshot of the final book
            c.send_json(sub(["MINA/GBP"], 2, method="unsubscribe"))
            c.send_json(sub(["MINA/GBP"], 3))
            (snap,) = await books(c, 1)
            assert snap.startswith(b'{"channel":"book","type":"snapshot"')
            assert checksum_of(snap) == checksum_of(expected[-1])
            assert Verifier().feed(snap) == [True]
            await c.close()
    run(main)


def test_generated_snapshot_matches_recorded_bytes() -> None:
    """At the recorded snapshot's point, the server's own rendering is the same bytes."""
    expected = capture_frames()

    async def main() -> None:
        async with serving(faults=["stall"]) as server:
            c = await connect(server)
            c.send_json(sub(["MINA/GBP"], 1))
            await c.recv_json()
            assert not any(is_book(r) for r in await quiet(c, 0.2))
            server.clear_faults()
            (first,) = await books(c, 1)
            assert first == expected[0]
            await c.close()
    run(main)


def test_resubscribe_mid_stream_gets_fresh_correct_snapshot(paced: Path) -> None:
    recorded = [checksum_of(f) for f in capture_frames()]

    async def main() -> None:
        async with serving(recording=paced, speed=1) as server:
            c = await connect(server)
            v = Verifier()
            c.send_json(sub(["MINA/GBP"], 1))
            for raw in await books(c, 4):                 # snapshot + 3 updates, then a gap
                v.feed(raw)
            c.send_json(sub(["MINA/GBP"], 2, method="unsubscribe"))
            await asyncio.sleep(0.5)                      # the book advances meanwhile
            c.send_json(sub(["MINA/GBP"], 3))
            ack, before = await c.recv_until(lambda m: m.get("req_id") == 3)
            assert not any(is_book(r) for r in before)    # nothing while unsubscribed
            (snap,) = await books(c, 1)
            assert snap.startswith(b'{"channel":"book","type":"snapshot"')
            assert recorded.index(checksum_of(snap)) >= 4  # it moved past the gap
            assert Verifier().feed(snap) == [True]
            v.feed(snap)
            later = await books(c, 3)
            for raw in later:
                v.feed(raw)
            assert all(v.verdicts) and len(v.verdicts) == 8
            await c.close()
    run(main)


def test_loop_restarts_with_fresh_snapshots() -> None:
    n = len(capture_frames())

    async def main() -> None:
        async with serving(loop=True) as server:
            c = await connect(server)
            c.send_json(sub(["MINA/GBP"], 1))
            got = await books(c, 2 * n + 5)
            v = Verifier()
            for raw in got:
                v.feed(raw)
            assert all(v.verdicts)
            assert got[n] == got[0] and got[2 * n] == got[0]   # the recorded snapshot again
            assert server.counters["loops"] >= 2
            await c.close()
    run(main)


# -------------------------------------------------------------------------------------
# faults

def test_fault_drop_now_and_after_n() -> None:
    expected = capture_frames()

    async def main() -> None:
        async with serving(faults=["drop:after=5"]) as server:
            c = await connect(server)
            c.send_json(sub(["MINA/GBP"], 1))
            got = [r for r in await quiet(c, 0.5) if is_book(r)]
            assert got == expected[:5] and c.closed and c.close_code is None
            c2 = await connect(server)                      # used up: a new one is served
            c2.send_json(sub(["MINA/GBP"], 1))
            assert await books(c2, len(expected)) == expected
            server.arm_fault("drop")
            with pytest.raises(ConnectionClosed):
                while True:
                    await c2.recv()
            assert server.counters["drops"] == 2
    run(main)


def test_fault_stall_keeps_heartbeats_and_stall_all_stops_everything() -> None:
    async def main() -> None:
        async with serving() as server:
            c = await connect(server)
            server.arm_fault("stall")
            c.send_json(sub(["MINA/GBP"], 1))
            assert (await c.recv_json())["success"] is True  # acks go on
            during = await quiet(c, 0.35)
            assert HEARTBEAT in during and not any(is_book(r) for r in during)
            server.clear_faults()
            assert len(await books(c, 30)) == 30              # nothing was lost
            server.arm_fault("stall-all")
            await asyncio.sleep(0.05)
            c.pending()
            c.send_json({"method": "ping", "req_id": 7})
            assert await quiet(c, 0.35) == []                 # no heartbeat, no pong
            server.clear_faults()
            pong, _ = await c.recv_until(lambda m: m.get("method") == "pong")
            assert pong["req_id"] == 7
            assert HEARTBEAT in await quiet(c, 0.25)
            await c.close()
    run(main)


def test_fault_stall_with_seconds_ends_by_itself() -> None:
    async def main() -> None:
        async with serving(faults=["stall:seconds=0.3"]) as server:
            c = await connect(server)
            c.send_json(sub(["MINA/GBP"], 1))
            assert len(await books(c, 30, timeout=3)) == 30
            await c.close()
    run(main)


def test_fault_silence_one_pair(paced: Path) -> None:
    async def main() -> None:
        async with serving(recording=paced, faults=["silence:pair=MINA/GBP"]) as server:
            c = await connect(server)
            c.send_json(sub(["MINA/GBP", "MINA/EUR"], 1))
            got = await quiet(c, 0.3)
            syms = {decode_book(r, PREC)[0].symbol for r in got if is_book(r)}
            assert syms == {"MINA/EUR"} and HEARTBEAT in got
            server.clear_faults()                    # the snapshot asked for comes now
            (snap,) = await books(c, 1)
            assert b'"MINA/GBP"' in snap and b'"type":"snapshot"' in snap
            assert Verifier().feed(snap) == [True]
            await c.close()
    run(main)


def test_fault_corrupt_once_and_always_keep_server_books_right() -> None:
    expected = capture_frames()

    async def main() -> None:
        async with serving(faults=["corrupt:pair=MINA/GBP,count=once"]) as server:
            c = await connect(server)
            c.send_json(sub(["MINA/GBP"], 1))
            got = await books(c, len(expected))
            v = Verifier()
            for raw in got:
                v.feed(raw)
            assert v.verdicts == [False] + [True] * (len(expected) - 1)
            assert got[1:] == expected[1:] and got[0] != expected[0]
            assert checksum_of(got[0]) != checksum_of(expected[0])
            server.arm_fault("corrupt:pair=MINA/GBP,count=always")
            c.send_json(sub(["MINA/GBP"], 2, method="unsubscribe"))
            c.send_json(sub(["MINA/GBP"], 3))
            (snap,) = await books(c, 1)
            assert Verifier().feed(snap) == [False]
            server.clear_faults()                         # the server's book is intact
            c.send_json(sub(["MINA/GBP"], 4, method="unsubscribe"))
            c.send_json(sub(["MINA/GBP"], 5))
            (snap,) = await books(c, 1)
            assert Verifier().feed(snap) == [True]
            assert checksum_of(snap) == checksum_of(expected[-1])
            await c.close()
    run(main)


def test_fault_skip_makes_the_client_book_wrong(paced: Path) -> None:
    expected = capture_frames()

    async def main() -> None:
        async with serving(recording=paced, speed=1) as server:
            c = await connect(server)
            c.send_json(sub(["MINA/GBP"], 1))
            got = await books(c, 4)                      # snapshot + 3, then a 400 ms gap
            server.arm_fault("skip:pair=MINA/GBP,count=1")
            got += await books(c, len(expected) - 5)
            assert got == expected[:4] + expected[5:]
            v = Verifier()
            for raw in got:
                v.feed(raw)
            assert v.verdicts[:4] == [True] * 4 and not all(v.verdicts)
            await c.close()
    run(main)


def test_fault_garbage_truncated_oversized() -> None:
    async def next_frame(c: WsClient) -> bytes:
        raw = await c.recv()
        while raw == HEARTBEAT:
            raw = await c.recv()
        return raw

    async def main() -> None:
        async with serving() as server:
            c = await connect(server)
            c.send_json(sub(["MINA/GBP"], 1))
            await books(c, 30)
            server.arm_fault("garbage")
            with pytest.raises(msgspec.DecodeError):
                msgspec.json.decode(await next_frame(c))
            server.arm_fault("truncated")
            raw = await next_frame(c)
            assert raw.startswith(b'{"channel":"book"')
            with pytest.raises(msgspec.DecodeError):
                msgspec.json.decode(raw)
            server.arm_fault("oversized")
            raw = await next_frame(c)
            assert len(raw) == 5 * 1024 * 1024 and msgspec.json.decode(raw)["channel"]
            server.arm_fault("oversized:bytes=1000")
            assert len(await next_frame(c)) == 1000
            assert not c.closed
            await c.close()
    run(main)


def test_fault_status_switch_keeps_connection_id() -> None:
    async def main() -> None:
        async with serving() as server:
            c = await WsClient.connect(server.url)
            first = decode_message(await c.recv())
            server.arm_fault("status:system=maintenance")
            msg, _ = await c.recv_until(lambda m: m.get("channel") == "status")
            assert msg["data"][0]["system"] == "maintenance"
            assert isinstance(first, Status)
            st = decode_message(msgspec.json.encode(msg))
            assert isinstance(st, Status)
            assert st.data[0].connection_id == first.data[0].connection_id
            c2 = await WsClient.connect(server.url)           # new connections see it too
            assert (await c2.recv_json())["data"][0]["system"] == "maintenance"
            server.clear_faults()                              # back online, told
            msg, _ = await c.recv_until(lambda m: m.get("channel") == "status")
            assert msg["data"][0]["system"] == "online"
            await c.close()
            await c2.close()
    run(main)


def test_fault_refuse_slow_acks_rate_limit() -> None:
    async def main() -> None:
        async with serving() as server:
            c = await connect(server)
            server.arm_fault("refuse:channel=book")
            c.send_json(sub(["MINA/GBP"], 1))
            r = await c.recv_json()
            assert r["success"] is False and r["error"] and r["req_id"] == 1
            assert "result" not in r
            server.arm_fault("rate-limit")
            c.send_json(sub(["MINA/GBP"], 2))
            assert await c.recv() == b'{"Error":"Exceeded msg rate"}'
            server.arm_fault("slow-acks:ms=300")
            t0 = time.monotonic()
            c.send_json(sub(["MINA/GBP"], 3))
            c.send_json({"method": "ping", "req_id": 4})
            assert (await c.recv_json())["method"] == "pong"   # overtakes the slow ack
            ack, _ = await c.recv_until(lambda m: m.get("req_id") == 3)
            assert ack["success"] is True and time.monotonic() - t0 >= 0.25
            assert len(await books(c, 30)) == 30
            await c.close()
    run(main)


def test_refuse_one_pair_only(paced: Path) -> None:
    async def main() -> None:
        async with serving(recording=paced, faults=["refuse:channel=book,pair=MINA/EUR"]) as s:
            c = await connect(s)
            c.send_json(sub(["MINA/GBP", "MINA/EUR"], 9))
            a, b = await c.recv_json(), await c.recv_json()
            assert a["success"] is True and a["result"]["symbol"] == "MINA/GBP"
            assert b["success"] is False and b["symbol"] == "MINA/EUR" and b["req_id"] == 9
            await c.close()
    run(main)


# -------------------------------------------------------------------------------------
# control socket, thread helper, CLI

def test_control_socket_arms_a_fault_at_run_time() -> None:
    async def main() -> None:
        async with serving(control_port=0) as server:
            assert server.control_endpoint and server.control_endpoint.startswith("tcp://")
            c = await connect(server)
            loop = asyncio.get_running_loop()
            ctl = ReplayControl(server.control_endpoint)
            try:
                reply = await loop.run_in_executor(None, ctl.fault, "status:system=post_only")
                assert reply["ok"] and reply["armed"] == "status:system=post_only"
                msg, _ = await c.recv_until(lambda m: m.get("channel") == "status")
                assert msg["data"][0]["system"] == "post_only"
                st = await loop.run_in_executor(None, ctl.status)
                assert st["counters"]["connections"] == 1 and st["system"] == "post_only"
                with pytest.raises(ControlError, match="unknown fault"):
                    await loop.run_in_executor(None, ctl.fault, "explode")
                with pytest.raises(ControlError, match="no adjustable rate"):
                    await loop.run_in_executor(None, ctl.synthetic_rate, 10)
                await loop.run_in_executor(None, ctl.fault, "drop")
                with pytest.raises(ConnectionClosed):
                    while True:
                        await c.recv()
            finally:
                ctl.close()
    run(main)


def test_run_in_thread_handle() -> None:
    with run_in_thread(recording=CAPTURE, price_precision=4, qty_precision=8, port=0,
                       speed="max", heartbeat_s=0.1) as h:
        assert h.port > 0

        async def main() -> None:
            c = await WsClient.connect(h.url)
            await c.recv_json()
            assert h.connections == 1
            h.arm_fault("garbage")
            raw = await c.recv()
            while raw == HEARTBEAT:
                raw = await c.recv()
            assert raw.startswith(b"<html>")
            await c.close()
        run(main)
        assert h.counters["connections_total"] == 1


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_cli_help_lists_every_fault() -> None:
    out = subprocess.run([sys.executable, "-m", "replay", "--help"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for syntax, _ in FAULT_TABLE:
        assert syntax in out.stdout, syntax


def test_cli_bad_flags_exit_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ndjson"
    bad.write_text('{"format":"krakenfeed-recording","version":1,"symbols":["A/B"],"depth":10,'
                   '"precisions":{"A/B":[1,1]}}\n{"rx_ns":1,"frame":{"channel":"book"\n')
    cfg = _config(tmp_path)
    for args in (["--file", str(CAPTURE), "--speed", "fast"],
                 ["--file", str(CAPTURE)],                       # no precisions anywhere
                 ["--file", str(CAPTURE), "--price-precision", "4", "--qty-precision", "8",
                  "--fault", "explode"],
                 ["--file", str(bad)]):
        out = subprocess.run([sys.executable, "-m", "replay", "--config", cfg, *args],
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=30)
        assert out.returncode == 2, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert "bad.ndjson:2" in out.stderr


def _config(tmp_path: Path) -> str:
    run_dir = tempfile.mkdtemp(prefix="kf")
    p = tmp_path / "test.toml"
    p.write_text(f'[system]\nnamespace = "kfreplaytest"\nrun_dir = "{run_dir}"\n'
                 '[trading]\npairs = ["MINA/GBP"]\n')
    return str(p)


def test_cli_subprocess_ready_line_control_and_sigterm(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "replay", "--config", _config(tmp_path), "--file", str(CAPTURE),
           "--price-precision", "4", "--qty-precision", "8", "--speed", "max",
           "--port", "0", "--control-port", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = ""
        deadline = time.monotonic() + 20
        while "listening" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, "replay exited before it was ready"
        assert line.startswith("replay: listening on ws://127.0.0.1:")
        url = line.split("listening on ")[1].split()[0]
        endpoint = line.split("(control ")[1].rstrip(")\n")

        async def main() -> None:
            c = await WsClient.connect(url)
            await c.recv_json()
            c.send_json(sub(["MINA/GBP"], 1))
            assert len(await books(c, 30)) == 30
            with ReplayControl(endpoint) as ctl:
                await asyncio.get_running_loop().run_in_executor(None, ctl.fault, "drop")
            with pytest.raises(ConnectionClosed):
                while True:
                    await c.recv()
        run(main)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_live_synthetic_source_books_verify_and_resubscribe() -> None:
    """A non-indexed source: the server keeps a Book per symbol for the connection."""
    synthetic = pytest.importorskip("replay.synthetic")
    source = synthetic.SyntheticSource(["BTC/USD"], depth=10, rate=2000.0)
    prec = source.precisions

    def verify(frames: list[bytes], books: dict[str, Book]) -> list[bool]:
        out = []
        for raw in frames:
            for u in decode_book(raw, prec):
                b = books.setdefault(u.symbol, Book(u.symbol, 10, *prec[u.symbol]))
                out.append(b.apply(u.snapshot, u.bids, u.asks) == u.checksum)
        return out

    async def main() -> None:
        async with serving(recording=None, source=source, speed=1) as server:
            c = await connect(server)
            c.send_json(sub(["BTC/USD"], 1, depth=10))
            first = await books(c, 40)
            assert first[0].startswith(b'{"channel":"book","type":"snapshot"')
            assert all(verify(first, {}))
            c.send_json(sub(["BTC/USD"], 2, depth=10, method="unsubscribe"))
            await asyncio.sleep(0.1)
            c.send_json(sub(["BTC/USD"], 3, depth=10))
            await c.recv_until(lambda m: m.get("req_id") == 3)
            again = await books(c, 40)
            assert again[0].startswith(b'{"channel":"book","type":"snapshot"')
            assert all(verify(again, {}))                     # fresh snapshot, then updates
            assert server.counters["snapshots_generated"] >= 1
            await c.close()
    run(main)
