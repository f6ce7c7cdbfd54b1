"""Fixtures for a real bus process (helpers in bushelp.py), used by test_bus.py and
test_bus_tail.py: `ctx` (a zmq.Context), `bus` (one bus per module) and `own_bus` (a
factory of buses with `[bus]` overrides, stopped at the end of the test)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.integration.bushelp import BusProcess
from tests.integration.harness import make_config, stop_process


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def _start(tmp: Path, **bus: Any) -> BusProcess:
    return BusProcess(make_config(tmp, ["BTC/USD", "BTC/USDT", "ETH/USD"],
                                  bus={"stats_interval_s": 0.2, **bus}))


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BusProcess]:
    """One bus shared by the tests that do not restart it or shrink its queues."""
    b = _start(tmp_path_factory.mktemp("bus"))
    try:
        yield b
    finally:
        rc = b.stop()
        shutil.rmtree(b.cfg.run_path, ignore_errors=True)
        assert rc == 0, f"bus exited {rc}:\n{b.proc.log()}"


@pytest.fixture
def own_bus(tmp_path: Path) -> Iterator[Callable[..., BusProcess]]:
    """Start a bus of this test's own (with `[bus]` overrides); stopped at the end."""
    started: list[BusProcess] = []

    def start(**bus_overrides: Any) -> BusProcess:
        b = _start(tmp_path, **bus_overrides)
        started.append(b)
        return b

    yield start
    for b in started:
        stop_process(b.proc)
        shutil.rmtree(b.cfg.run_path, ignore_errors=True)
