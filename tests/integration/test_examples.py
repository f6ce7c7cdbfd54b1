"""The subscriber examples (examples/node, examples/c, examples/python_subscriber.py)
against a live bus fed by a producer.

Each example must print real best bid/ask values that were published for its pair (and
never another pair's). Node needs `node` and `npm ci` run in examples/node; C needs a
C compiler and the libzmq headers (libzmq3-dev); `.ci/run` installs both where it can.
Without them those tests skip and say why.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from tests.integration.bushelp import BusProcess, Producer, book
from tests.integration.harness import ROOT, _env, make_config

EXAMPLES = ROOT / "examples"
NODE_DIR = EXAMPLES / "node"
LINE = re.compile(r"^(?P<pair>\S+)  bid (?P<bp>\S+) x (?P<bq>\S+)  ask (?P<ap>\S+) x (?P<aq>\S+)"
                  r"  seq (?P<seq>\d+)(?P<note>  \(cache\))?$")
COUNT = 5


class Feed:
    """A bus plus a producer thread publishing BTC/USD, BTC/USDT and ETH/USD books;
    `published(pair)` is every (bid price, bid qty, ask price, ask qty) sent so far."""

    def __init__(self, cfg: Path) -> None:
        self.bus = BusProcess(cfg)
        self.ctx = zmq.Context()
        self.producer = Producer(self.ctx, self.bus.cfg)
        self._sent: dict[str, set[tuple[str, str, str, str]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(0.005):
            i += 1
            for pair, k in (("BTC/USD", i), ("BTC/USDT", 500_000 + i), ("ETH/USD", -40_000 + i)):
                ev = book(pair, k)
                with self._lock:
                    self._sent.setdefault(pair, set()).add(
                        (ev.bids[0][0], ev.bids[0][1], ev.asks[0][0], ev.asks[0][1]))
                self.producer.send(ev)

    def published(self, pair: str) -> set[tuple[str, str, str, str]]:
        with self._lock:
            return set(self._sent.get(pair, ()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.producer.close()
        self.ctx.destroy(linger=0)
        rc = self.bus.stop()
        shutil.rmtree(self.bus.cfg.run_path, ignore_errors=True)
        assert rc == 0, self.bus.proc.log()


@pytest.fixture(scope="module")
def feed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Feed]:
    cfg = make_config(tmp_path_factory.mktemp("examples"), ["BTC/USD", "BTC/USDT", "ETH/USD"])
    f = Feed(cfg)
    try:
        yield f
    finally:
        f.close()


def check_output(out: subprocess.CompletedProcess, feed: Feed, pair: str,
                 count: int = COUNT) -> list[re.Match]:
    assert out.returncode == 0, f"exit {out.returncode}\nstdout:\n{out.stdout}\n" \
                                f"stderr:\n{out.stderr}"
    lines = out.stdout.splitlines()
    assert len(lines) == count, out.stdout
    matches = []
    published = feed.published(pair)
    for text in lines:
        m = LINE.match(text)
        assert m, f"unexpected line {text!r}"
        assert m["pair"] == pair
        assert (m["bp"], m["bq"], m["ap"], m["aq"]) in published, f"never published: {text}"
        matches.append(m)
    seqs = [int(m["seq"]) for m in matches]
    assert seqs == sorted(set(seqs)) and seqs[0] >= 1
    return matches


def run(cmd: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)


def test_node_example(feed: Feed):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the Node example needs Node.js >= 18)")
    if not (NODE_DIR / "node_modules" / "zeromq" / "package.json").is_file():
        pytest.skip("examples/node/node_modules is missing: run `npm ci` in examples/node")
    out = run([node, "subscribe.js", feed.bus.json_ep, "BTC/USD", str(COUNT)], cwd=NODE_DIR)
    check_output(out, feed, "BTC/USD")
    # A bare port works too, and another pair gets its own books only.
    out = run([node, "subscribe.js", str(feed.bus.cfg.port("bus", "json_port")), "BTC/USDT",
               "3"], cwd=NODE_DIR)
    check_output(out, feed, "BTC/USDT", 3)


@pytest.fixture(scope="module")
def c_subscriber(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler (cc) is installed")
    probe = subprocess.run([cc, "-E", "-x", "c", "-"], input="#include <zmq.h>\n",
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the libzmq headers are not installed (apt-get install libzmq3-dev)")
    exe = tmp_path_factory.mktemp("c") / "subscribe"
    # The build command the example documents, plus warnings.
    build = subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe),
                            str(EXAMPLES / "c" / "subscribe.c"), "-lzmq"],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    return exe


def test_c_example(feed: Feed, c_subscriber: Path):
    out = run([str(c_subscriber), feed.bus.json_ep, "BTC/USD", str(COUNT)])
    check_output(out, feed, "BTC/USD")
    out = run([str(c_subscriber), feed.bus.json_ep, "ETH/USD", "3"])
    check_output(out, feed, "ETH/USD", 3)


def test_python_example_live(feed: Feed):
    out = run([sys.executable, str(EXAMPLES / "python_subscriber.py"), "--endpoint",
               feed.bus.json_ep, "--pair", "BTC/USD", "--count", str(COUNT)])
    matches = check_output(out, feed, "BTC/USD")
    assert not any(m["note"] for m in matches)


def test_python_example_late_join(feed: Feed):
    out = run([sys.executable, str(EXAMPLES / "python_subscriber.py"), "--config",
               str(feed.bus.cfg_path), "--pair", "BTC/USD", "--count", "20", "--late-join"])
    matches = check_output(out, feed, "BTC/USD", 20)
    # The cached book first, then the live stream stitched without gap or duplicate.
    assert matches[0]["note"] and not any(m["note"] for m in matches[1:])
    seqs = [int(m["seq"]) for m in matches]
    assert seqs == list(range(seqs[0], seqs[0] + 20))
    assert "lost" not in out.stderr
