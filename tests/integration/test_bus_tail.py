"""`python -m bus.tail` against a real bus: JSON envelopes, one topic, the cache and
the live stream stitched by seq, and a clear exit without a bus."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from bus.schema import decode_envelope_json
from ingest.config import load_config
from tests.integration.bushelp import (
    TIMEOUT,
    BusProcess,
    Producer,
    ask_cache,
    book,
    trade,
)
from tests.integration.harness import ROOT, _env, make_config, wait_for


def _tail(cfg: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bus.tail", "--config", str(cfg), *args],
                          cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


class _Background:
    """A thread publishing `make(i)` for i = 1, 2, ... until closed."""

    def __init__(self, producer: Producer, *makers: Callable[[int], Any],
                 pause: float = 0.002) -> None:
        self.stop = threading.Event()
        self.producer = producer

        def run() -> None:
            i = 0
            while not self.stop.wait(pause):
                i += 1
                for make in makers:
                    producer.send(make(i))

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.producer.close()


def test_tail_prints_json_envelopes_and_exits_0(bus: BusProcess, ctx: zmq.Context):
    bg = _Background(Producer(ctx, bus.cfg), lambda i: trade("ETH/USD", i))
    try:
        out = _tail(bus.cfg_path, "--count", "3", "--json")
    finally:
        bg.close()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3
    for line in lines:
        env, _ = decode_envelope_json(line.encode())
        assert env.epoch == bus.epoch


def test_tail_topic_prints_only_that_pair(bus: BusProcess, ctx: zmq.Context):
    bg = _Background(Producer(ctx, bus.cfg), lambda i: book("BTC/USDT", i),
                     lambda i: book("BTC/USD", i))
    try:
        wait_for(lambda: len(ask_cache(ctx, bus.cache_ep, b"book.BTC/USDT")["messages"]),
                 TIMEOUT, "a BTC/USDT book in the cache")
        out = _tail(bus.cfg_path, "--topic", "book.BTC/USD", "--count", "5", "--json")
        readable = _tail(bus.cfg_path, "--topic", "book.BTC/USD", "--count", "2")
    finally:
        bg.close()
    assert out.returncode == 0, out.stderr
    envs = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(envs) == 5
    assert {e["topic"] for e in envs} == {"book.BTC/USD"}
    assert {e["event"]["pair"] for e in envs} == {"BTC/USD"}
    # The cached one first, then live ones: stitched without gap or duplicate.
    seqs = [e["seq"] for e in envs]
    assert seqs == list(range(seqs[0], seqs[0] + 5))
    assert readable.returncode == 0, readable.stderr
    lines = readable.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("BTC/USD  bid ") for line in lines)


def test_tail_stitches_cache_and_live_without_gap_on_a_busy_topic(bus: BusProcess,
                                                                   ctx: zmq.Context):
    # Asked before its subscription is in effect, the cache misses what the bus
    # publishes in between: on a busy topic that shows as a seq gap after the first line.
    bg = _Background(Producer(ctx, bus.cfg), lambda i: book("SOL/USD", i), pause=0.0002)
    try:
        runs = [_tail(bus.cfg_path, "--topic", "book.SOL/USD", "--count", "30", "--json")
                for _ in range(3)]
    finally:
        bg.close()
    for out in runs:
        assert out.returncode == 0, out.stderr
        seqs = [json.loads(line)["seq"] for line in out.stdout.splitlines()]
        assert seqs == list(range(seqs[0], seqs[0] + 30)), seqs[:5]


def test_tail_without_a_bus_exits_1_with_a_clear_message(tmp_path: Path):
    cfg = make_config(tmp_path, ["BTC/USD"])
    try:
        out = _tail(cfg, "--count", "3", "--json", "--timeout", "1", timeout=20)
    finally:
        shutil.rmtree(load_config(cfg).run_path, ignore_errors=True)
    assert out.returncode == 1
    assert out.stdout == ""
    port = load_config(cfg).port("bus", "cache_port")
    assert "no bus answered" in out.stderr and str(port) in out.stderr
    assert "Traceback" not in out.stderr


def test_a_stats_line_shows_counters_then_gauges():
    from bus.tail import describe

    env = {"type": "StatsEvent", "event": {
        "process": "bookd", "counters": {"frames": 12, "mismatches": 0},
        "gauges": {"last_frame_age_ms": 0.41234567, "publish_lag_p50_us": 372.649}}}
    assert describe("stats", env) == ("stats  bookd: frames=12, mismatches=0; "
                                      "last_frame_age_ms=0.412346, publish_lag_p50_us=372.649")
    for gauges in ({}, {"note": "not a number"}):
        env["event"]["gauges"] = gauges
        assert describe("stats", env) == "stats  bookd: frames=12, mismatches=0"
