"""The load test's rate search (bench/loadtest.py `search`): it must land on the highest
grid rate a pipeline holds, within its step budget, whatever the burst ceiling said."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from loadtest import search  # noqa: E402

GRID = [10_000, 20_000, 25_000, 30_000, 35_000, 40_000, 45_000, 50_000, 55_000, 60_000,
        70_000, 80_000, 90_000, 100_000, 120_000, 140_000]  # the full scale's d10 grid


class FakePipe:
    """Holds every rate up to `capacity`; a rate in `flaky` fails its first try."""

    name = "d10"

    def __init__(self, capacity: int, flaky: tuple[int, ...] = ()) -> None:
        self.capacity = capacity
        self.flaky = set(flaky)
        self.tried: list[str] = []

    def step(self, label, rec, speed, seconds, *, nominal):  # noqa: ANN001
        self.tried.append(label)
        if nominal in self.flaky:
            self.flaky.discard(nominal)
            return {"held": False}
        return {"held": nominal <= self.capacity}

    def best(self) -> int | None:
        held = [int(t.split("k")[0]) * 1000 for t in self.tried
                if int(t.split("k")[0]) * 1000 <= self.capacity]
        return max(held, default=None)


def _run(pipe: FakePipe, ceiling: float, *, retry: bool, max_steps: int = 8,
         held_already: int = 10_000) -> None:
    sc = {"start_frac": 1.0, "deadline_s": 1e9, "step_s": 10.0, "retry": retry}
    search(pipe, SimpleNamespace(rate=10_000), GRID, ceiling, sc, max_steps, held_already)


def test_a_burst_far_above_what_holds_still_finds_it_in_budget():
    # The run that motivated bisection: burst 51 k, the pipeline holds 35 k; walking
    # down 5 k at a time with retries spent all 8 steps above 35 k.
    pipe = FakePipe(35_000)
    _run(pipe, 51_385, retry=True)
    assert pipe.best() == 35_000
    assert pipe.tried == ["50k", "50k-2", "30k", "40k", "40k-2", "35k"]


@pytest.mark.parametrize("capacity", [20_000, 30_000, 45_000, 60_000, 90_000])
@pytest.mark.parametrize("ceiling", [25_000, 51_000, 75_000])
def test_lands_on_the_highest_rate_held(capacity, ceiling):
    pipe = FakePipe(capacity)
    _run(pipe, ceiling, retry=True, max_steps=20)
    assert pipe.best() == capacity
    tried = {int(t.split("k")[0]) * 1000 for t in pipe.tried}
    above = [r for r in GRID if r > capacity]
    assert not above or above[0] in tried  # the next rate up was tried and failed


def test_nothing_held_above_what_was_held_already():
    pipe = FakePipe(15_000)
    _run(pipe, 51_000, retry=False)
    assert pipe.best() is None
    assert pipe.tried == ["50k", "30k", "20k"]


def test_a_flaky_failure_gets_its_second_try_at_full_scale():
    pipe = FakePipe(40_000, flaky=(40_000,))
    _run(pipe, 41_000, retry=True)
    assert pipe.tried[:2] == ["40k", "40k-2"] and pipe.best() == 40_000


def test_the_step_budget_is_respected():
    pipe = FakePipe(140_000)
    _run(pipe, 20_000, retry=True, max_steps=3)
    assert pipe.tried == ["20k", "25k", "30k"]
