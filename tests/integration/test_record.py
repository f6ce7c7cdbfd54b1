"""The recorder (ingest/record.py): its writer thread in-process, then end to end.

In-process: the writer thread with an injected writer (order, lazy header, drops,
bounded close, rotation, write errors) and with the real `RecordingWriter` (raw_b64).

End to end: `python -m ingest.record` against the replay server serving
`--synthetic` (three pairs, own namespace, free ports, short run dir), checked with
`python -m bookd.verify` and `python -m replay --file`. Waits are bounded; nothing
asserts how fast anything is.
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from bookd.verify import Verifier
from ingest.config import load_config
from ingest.record import CLOCK, Recorder, numbered
from replay.frames import garbage_frame
from replay.recording import iter_lines, read_recording

from .harness import (
    FakeBus,
    ReplayHandle,
    make_config,
    start_ingest,
    start_replay,
    stop_process,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ["BTC/USD", "ETH/USD", "SOL/USD"]
SUMMARY = "ingest.record: "


# -------------------------------------------------------------------------------------
# the writer thread, with an injected writer

def instrument(*pairs: tuple[str, int, int]) -> bytes:
    body = ",".join(f'{{"symbol":"{s}","status":"online","price_precision":{p},'
                    f'"qty_precision":{q}}}' for s, p, q in pairs)
    return b'{"channel":"instrument","type":"snapshot","data":{"assets":[],"pairs":[' \
        + body.encode() + b"]}}"


def book(sym: str, kind: str = "update") -> bytes:
    return (f'{{"channel":"book","type":"{kind}","data":[{{"symbol":"{sym}","bids":[],'
            f'"asks":[],"checksum":0}}]}}').encode()


class FakeWriter:
    """Stands in for RecordingWriter: keeps the header and the lines; `gate` (an
    Event) holds every write_frame until set; `blocked` is set while one waits."""

    def __init__(self, path: Path, *, symbols, depth, precisions, url, started_utc,
                 clock, continues, gate: threading.Event, blocked: threading.Event,
                 fail_after: int | None = None) -> None:
        self.path = path
        self.header = {"symbols": list(symbols), "depth": depth, "precisions": dict(precisions),
                       "url": url, "started_utc": started_utc, "clock": clock,
                       "continues": continues}
        self.lines: list[tuple[int, bytes, bool]] = []
        self.bytes = 100
        self.raw_frames = 0
        self.flushes = 0
        self.closed = False
        self.gate = gate
        self.blocked = blocked
        self.fail_after = fail_after

    def write_frame(self, rx_ns: int, frame: bytes, *, tx: bool = False) -> None:
        if not self.gate.is_set():
            self.blocked.set()
            self.gate.wait()
        if self.fail_after is not None and len(self.lines) >= self.fail_after:
            raise OSError(28, "No space left on device")
        self.lines.append((rx_ns, frame, tx))
        self.bytes += len(frame) + 20

    def flush(self) -> None:
        self.flushes += 1

    def size(self) -> int:
        return self.bytes

    def close(self) -> None:
        self.closed = True


class Sink:
    """The `open_writer` factory: every FakeWriter it made, in order."""

    def __init__(self, open_gate: bool = True, fail_after: int | None = None) -> None:
        self.gate = threading.Event()
        if open_gate:
            self.gate.set()
        self.blocked = threading.Event()
        self.writers: list[FakeWriter] = []
        self.fail_after = fail_after

    def __call__(self, path: Path, **kw) -> FakeWriter:
        w = FakeWriter(path, gate=self.gate, blocked=self.blocked, fail_after=self.fail_after,
                       **kw)
        self.writers.append(w)
        return w

    def lines(self) -> list[tuple[int, bytes, bool]]:
        return [ln for w in self.writers for ln in w.lines]


def recorder(tmp_path: Path, sink: Sink, **kw) -> Recorder:
    kw.setdefault("symbols", ("A/B", "C/D"))
    kw.setdefault("depth", 10)
    return Recorder(tmp_path / "rec.ndjson", open_writer=sink, poll_s=0.001, url="ws://x",
                    **kw)


def test_writer_thread_holds_frames_until_the_precisions_are_known(tmp_path: Path) -> None:
    sink = Sink()
    rec = recorder(tmp_path, sink)
    frames = [(1, b'{"method":"subscribe"}', True), (2, b'{"channel":"status"}', False),
              (3, b'{"channel":"heartbeat"}', False),
              (4, instrument(("A/B", 1, 8), ("X/Y", 3, 3), ("C/D", 5, 2)), False),
              (5, book("A/B", "snapshot"), False), (6, b"not json", False),
              (7, b'{"method":"ping"}', True)]
    for rx_ns, frame, tx in frames:
        (rec.tx if tx else rec.rx)(frame, rx_ns)
    rec.close()
    (w,) = sink.writers
    # The instrument frame came fourth, yet the header has both precisions (and only
    # the configured pairs): the first three frames waited for it.
    assert w.header["precisions"] == {"A/B": (1, 8), "C/D": (5, 2)}
    assert w.header["symbols"] == ["A/B", "C/D"] and w.header["depth"] == 10
    assert w.header["clock"] == CLOCK and w.header["url"] == "ws://x"
    assert w.lines == frames and w.closed
    c = rec.counters()
    assert (c["recorded"], c["record_drops"], c["record_files"], c["record_queue"]) == (7, 0, 1, 0)
    assert rec.files == [str(tmp_path / "rec.ndjson")]


def test_header_goes_out_at_the_first_book_frame(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    sink = Sink()
    rec = recorder(tmp_path, sink)
    rec.rx(instrument(("A/B", 2, 4)), 1)    # C/D is not in the instrument snapshot
    rec.rx(book("A/B", "snapshot"), 2)
    wait_for(lambda: sink.writers and len(sink.writers[0].lines) == 2, 5, "the header")
    rec.rx(instrument(("C/D", 1, 1)), 3)    # too late for this file's header
    with caplog.at_level(logging.WARNING, "ingest.record"):
        rec.close()
    assert sink.writers[0].header["precisions"] == {"A/B": (2, 4)}
    assert len(sink.lines()) == 3
    assert any("without precisions for C/D" in r.message for r in caplog.records)


def test_header_written_at_close_when_nothing_told_the_precisions(tmp_path: Path) -> None:
    sink = Sink()
    rec = recorder(tmp_path, sink)
    rec.rx(b'{"channel":"heartbeat"}', 1)
    rec.close()
    (w,) = sink.writers
    assert w.header["precisions"] == {} and w.lines == [(1, b'{"channel":"heartbeat"}', False)]
    assert w.closed


def test_a_full_queue_drops_counts_and_says_so(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "ingest.record")
    sink = Sink(open_gate=False)
    rec = recorder(tmp_path, sink, queue_size=3)
    rec.rx(instrument(("A/B", 1, 1), ("C/D", 1, 1)), 1)
    assert sink.blocked.wait(5), "the writer never tried to write"
    # The writer thread is stuck in write_frame: the queue takes exactly 3 more.
    for i in range(11):
        rec.rx(b'{"channel":"heartbeat"}', 10 + i)
    assert rec.counters()["record_drops"] == 8 and rec.counters()["record_queue"] == 3
    # The first drop is reported at once, by the caller (the writer is the stuck one) ...
    assert [r for r in caplog.records if "queue full" in r.message]
    caplog.clear()
    sink.gate.set()
    rec.close()
    # ... and every drop by the writer thread once it runs again.
    assert any("8 in all" in r.message for r in caplog.records)
    assert [ln[0] for ln in sink.lines()] == [1, 10, 11, 12]
    c = rec.counters()
    assert (c["recorded"], c["record_drops"]) == (4, 8)
    assert "8 DROPPED" in rec.summary()
    rec.rx(b'{"channel":"heartbeat"}', 99)   # after close: counted, not queued
    assert rec.counters()["record_drops"] == 9 and rec.counters()["record_queue"] == 0


def test_close_is_bounded_and_counts_what_it_could_not_write(tmp_path: Path) -> None:
    sink = Sink(open_gate=False)
    rec = recorder(tmp_path, sink)
    rec.rx(instrument(("A/B", 1, 1), ("C/D", 1, 1)), 0)
    assert sink.blocked.wait(5)
    n = 5000
    for i in range(n):
        rec.rx(b'{"channel":"heartbeat"}', i + 1)

    def disk_comes_back_after_the_deadline() -> None:
        rec._closing.wait(10)       # close() has begun: its deadline is 0.05 s away
        time.sleep(0.3)
        sink.gate.set()

    t = threading.Thread(target=disk_comes_back_after_the_deadline)
    t.start()
    rec.close(timeout=0.05)
    t.join()
    c = rec.counters()
    assert c["record_drops"] > 0, c
    assert c["recorded"] + c["record_drops"] == n + 1
    assert c["recorded"] == len(sink.lines()) and sink.writers[0].closed
    assert [ln[0] for ln in sink.lines()] == list(range(c["recorded"]))  # a prefix, in order


def test_rotation_by_size_gives_complete_files(tmp_path: Path) -> None:
    sink = Sink()
    rec = recorder(tmp_path, sink, max_bytes=2000)
    rec.rx(instrument(("A/B", 1, 2), ("C/D", 3, 4)), 0)
    frame = b'{"channel":"heartbeat","pad":"' + b"x" * 80 + b'"}'
    for i in range(200):
        rec.rx(frame, i + 1)
    rec.close()
    assert len(sink.writers) >= 5
    assert [w.path.name for w in sink.writers] == \
        [f"rec.{i + 1:04d}.ndjson" for i in range(len(sink.writers))]
    assert all(w.header["precisions"] == {"A/B": (1, 2), "C/D": (3, 4)} and w.closed
               for w in sink.writers)
    # each part after the first names the one before it
    assert [w.header["continues"] for w in sink.writers] == \
        [None] + [w.path.name for w in sink.writers[:-1]]
    assert [ln[0] for ln in sink.lines()] == list(range(201))  # nothing lost or repeated
    assert all(w.bytes < 2000 + 2000 // 16 + 200 for w in sink.writers)
    assert rec.counters()["record_files"] == len(sink.writers)


def test_a_write_error_is_reported_and_later_frames_are_counted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sink = Sink(fail_after=2)
    rec = recorder(tmp_path, sink)
    with caplog.at_level(logging.ERROR, "ingest.record"):
        rec.rx(instrument(("A/B", 1, 1), ("C/D", 1, 1)), 0)
        for i in range(5):
            rec.rx(b'{"channel":"heartbeat"}', i + 1)
        rec.close()
    c = rec.counters()
    assert (c["recorded"], c["record_drops"]) == (2, 4)
    assert rec.error and "No space left" in rec.error and "ERROR" in rec.summary()
    assert any("cannot write" in r.message for r in caplog.records)


def test_numbered_names_continue_after_existing_files(tmp_path: Path) -> None:
    assert numbered(Path("d/rec.ndjson.gz"), 3) == Path("d/rec.0003.ndjson.gz")
    assert numbered(Path("d/rec.gz"), 1) == Path("d/rec.0001.gz")
    assert numbered(Path("d/rec"), 12) == Path("d/rec.0012")
    (tmp_path / "rec.0007.ndjson.gz").write_bytes(b"")
    sink = Sink()
    rec = Recorder(tmp_path / "rec.ndjson.gz", symbols=("A/B",), depth=10, rotate_s=60,
                   open_writer=sink, poll_s=0.001)
    rec.rx(b'{"channel":"heartbeat"}', 1)
    rec.close()
    assert [w.path.name for w in sink.writers] == ["rec.0008.ndjson.gz"]
    assert sink.writers[0].header["continues"] is None  # rec.0007 is another run's


def test_real_writer_keeps_frames_verbatim_and_non_json_as_raw_b64(tmp_path: Path) -> None:
    path = tmp_path / "rec.ndjson.gz"
    rec = Recorder(path, symbols=("A/B",), depth=10, poll_s=0.001)
    frames = [instrument(("A/B", 1, 8)),
              b'{"channel":"book","type":"update","data":[{"symbol":"A/B","bids":'
              b'[{"price":1234567890.12345678,"qty":0.00000000}],"asks":[],"checksum":1}]}',
              garbage_frame(), b'{"channel":"book",', b'{"a":\n1}']
    for i, f in enumerate(frames):
        rec.rx(f, i)
    rec.tx(b'{"method":"ping","req_id":9}', 9)
    rec.close()
    assert rec.counters()["record_raw"] == 2
    r, lines = iter_lines(path)
    got = list(lines)
    assert r.precisions == {"A/B": (1, 8)} and r.header["clock"] == CLOCK
    assert [ln.frame for ln in got] == [frames[0], frames[1], None, None, b'{"a": 1}',
                                        b'{"method":"ping","req_id":9}']
    assert [ln.raw for ln in got if ln.raw is not None] == [garbage_frame(), frames[3]]
    assert got[-1].tx and not got[0].tx


# -------------------------------------------------------------------------------------
# end to end

def _cleanup(cfg: Path) -> None:
    shutil.rmtree(load_config(cfg).run_path, ignore_errors=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("record")


@pytest.fixture(scope="module")
def cfg(work: Path) -> Iterator[Path]:
    path = make_config(work, PAIRS)
    yield path
    _cleanup(path)


@pytest.fixture(scope="module")
def server(cfg: Path) -> Iterator[ReplayHandle]:
    h = start_replay(cfg, "--synthetic")
    yield h
    h.stop()


def record(cfg: Path, url: str, out: Path, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    """Run the standalone recorder to the end; (process, its summary line)."""
    p = subprocess.run([sys.executable, "-m", "ingest.record", "--config", str(cfg), "--url",
                        url, "--out", str(out), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(SUMMARY)]
    assert len(lines) == 1, p.stdout
    return p, lines[0]


def verify_cli(*files: Path) -> tuple[int, dict]:
    p = subprocess.run([sys.executable, "-m", "bookd.verify", "--quiet", *map(str, files)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode in (0, 1), p.stderr
    return p.returncode, json.loads(p.stdout.strip().splitlines()[-1])


def verify_one(path: Path) -> dict:
    v = Verifier(progress=False)
    v.run_file(str(path))
    return v.result()


def header(path: Path) -> dict:
    with gzip.open(path) if path.suffix == ".gz" else open(path, "rb") as f:
        return msgspec.json.decode(f.readline())


def files_of(summary: str) -> list[Path]:
    return [Path(f) for f in summary.split("file(s): ", 1)[1].split(", ")]


def test_record_synthetic_market(cfg: Path, server: ReplayHandle, work: Path) -> None:
    out = work / "basic.ndjson"
    p, summary = record(cfg, server.url, out, "--duration", "3")
    assert files_of(summary) == [out] and "0 dropped" in summary
    h = header(out)
    assert h["format"] == "krakenfeed-recording" and h["version"] == 1
    assert h["symbols"] == PAIRS and h["depth"] == 10 and h["url"] == server.url
    assert sorted(h["precisions"]) == sorted(PAIRS)
    assert all(len(v) == 2 for v in h["precisions"].values())
    rc, res = verify_cli(out)
    assert rc == 0 and res["checksums"] > 0 and res["mismatch"] == 0, res
    assert res["tx"] > 0 and res["channels"]["heartbeat"] > 0
    assert res["channels"]["ack:subscribe"] > 0 and res["channels"]["instrument"] == 1
    assert set(res["symbols"]) == set(PAIRS)
    assert all(s["price_precision"] == h["precisions"][sym][0]
               for sym, s in res["symbols"].items())
    assert f"{res['frames']:,} frames" in summary


def test_recording_replays_through_the_replay_server(server: ReplayHandle, work: Path) -> None:
    # With OHLC on: the synthetic server answers an OHLC subscribe with an empty
    # snapshot (`"data":[]`, no symbol); `replay --file` skips such frames.
    cfg2 = make_config(work, PAIRS, data_ingestor={"ohlc_intervals": ["1m"]})
    try:
        first = work / "first.ndjson.gz"
        record(cfg2, server.url, first, "--duration", "2.5")
        replayed = start_replay(cfg2, "--file", str(first))
        try:
            assert "every checksum verifies" in replayed.proc.log()
            second = work / "second.ndjson"
            record(cfg2, replayed.url, second, "--duration", "2")
        finally:
            replayed.stop()
        rc, res = verify_cli(second)
        assert rc == 0 and res["checksums"] > 0 and res["mismatch"] == 0, res
        assert res["symbols"].keys() == set(PAIRS)
        assert header(second)["precisions"] == header(first)["precisions"]
    finally:
        _cleanup(cfg2)


def test_rotation_by_size(cfg: Path, server: ReplayHandle, work: Path) -> None:
    out = work / "rot.ndjson"
    _, summary = record(cfg, server.url, out, "--duration", "3", "--record-max-bytes", "10000")
    files = files_of(summary)
    assert len(files) >= 3, summary
    assert [f.name for f in files] == [f"rot.{i + 1:04d}.ndjson" for i in range(len(files))]
    assert not out.exists()
    total = book_msgs = 0
    for i, f in enumerate(files):
        h = header(f)
        assert h["symbols"] == PAIRS and sorted(h["precisions"]) == sorted(PAIRS)
        assert h.get("continues") == (files[i - 1].name if i else None)
        res = verify_one(f)
        assert res["mismatch"] == 0 and res["bad_frames"] == 0 and res["crossed"] == 0, (f, res)
        if i == 0:
            assert res["checksums"] > 0
        else:  # alone, a part starts mid-stream: updates before a snapshot are skipped
            assert res["skipped"] > 0, (f, res)
        total += res["frames"]
        book_msgs += res["checksums"] + res["skipped"]
    assert f"{total:,} frames" in summary

    # Together, in order, the parts are one stream: every book message is checked.
    rc, res = verify_cli(*files)
    assert rc == 0 and res["mismatch"] == 0 and res["skipped"] == 0, res
    assert res["checksums"] == book_msgs and not res["errors"], res
    # A part given without the one before it starts fresh, and the report says so.
    _, res = verify_cli(files[0], files[2])
    assert res["skipped"] > 0 and [e["kind"] for e in res["errors"]] == ["part"], res
    # The replay server serves the parts as one recording: every checksum verifies.
    replayed = start_replay(cfg, "--file", *map(str, files))
    try:
        log = replayed.proc.log()
        assert f"and {len(files) - 1} more part(s)" in log and "every checksum verifies" in log
    finally:
        replayed.stop()
    # A later part alone is served, with a warning that it cannot build books.
    alone = start_replay(cfg, "--file", str(files[1]))
    try:
        assert f"a rotated part that continues {files[0].name}" in alone.proc.log()
    finally:
        alone.stop()
    # ... and refuses parts out of order, saying which.
    p = subprocess.run([sys.executable, "-m", "replay", "--config", str(cfg), "--port", "0",
                        "--file", str(files[1]), str(files[0])], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert f"{files[0]}: not the part after {files[1].name}" in p.stderr, p.stderr


def test_gzip_recording_is_complete_after_sigterm(cfg: Path, server: ReplayHandle,
                                                  work: Path) -> None:
    out = work / "term.ndjson.gz"
    p = subprocess.Popen([sys.executable, "-m", "ingest.record", "--config", str(cfg),
                          "--url", server.url, "--out", str(out)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: out.exists() and out.stat().st_size > 2000 or p.poll() is not None,
                 20, "recorded data on disk")
        assert p.poll() is None
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, stderr[-3000:]
    assert stdout.startswith(SUMMARY) and "0 dropped" in stdout
    with gzip.open(out) as f:       # the whole gzip stream, trailer included
        data = f.read()
    assert data.endswith(b"}\n")
    rc, res = verify_cli(out)
    assert rc == 0 and res["checksums"] > 0 and res["mismatch"] == 0, res
    assert res["truncated_tail"] == 0


def test_garbage_is_kept_as_raw_b64_and_time_rotation(work: Path) -> None:
    cfg3 = make_config(work, PAIRS)
    try:
        srv = start_replay(cfg3, "--synthetic", "--fault", "garbage")
        try:
            out = work / "garbage.ndjson.gz"
            _, summary = record(cfg3, srv.url, out, "--duration", "3",
                                "--record-rotate-s", "1")
        finally:
            srv.stop()
        files = files_of(summary)
        assert len(files) >= 2, summary
        assert "1 raw_b64" in summary
        _, res = verify_cli(*files)
        assert res["raw_b64"] == 1 and res["mismatch"] == 0, res
        raws = [ln.raw for f in files for ln in iter_lines(f)[1] if ln.raw is not None]
        assert raws == [garbage_frame()]
        assert sum(len(read_recording(f).frames) for f in files) > 0
    finally:
        _cleanup(cfg3)


def test_a_tiny_queue_with_a_fast_source_counts_drops(work: Path) -> None:
    cfg4 = make_config(work, PAIRS)
    try:
        srv = start_replay(cfg4, "--synthetic")
        try:
            srv.control.synthetic_rate(20000)
            out = work / "drops.ndjson"
            p, summary = record(cfg4, srv.url, out, "--duration", "2", "--record-queue", "1")
        finally:
            srv.stop()
        assert "DROPPED" in summary, summary
        assert "queue full" in p.stderr
        drops = int(summary.split(" DROPPED")[0].rsplit(", ", 1)[1].replace(",", ""))
        assert drops > 0
        # Still a readable recording of what was kept (with the instrument frame
        # perhaps among the dropped ones, so no precisions to verify books with).
        rec = read_recording(out)
        assert rec.symbols == tuple(PAIRS) and len(rec.frames) > 0
    finally:
        _cleanup(cfg4)


def test_ingest_records_with_record_flag_and_reports_counters(cfg: Path, server: ReplayHandle,
                                                              work: Path) -> None:
    out = work / "ingest.ndjson.gz"
    bus = FakeBus(cfg)          # ingest's StatsEvents arrive here
    ingest = start_ingest(cfg, server.url, "--record", str(out))
    try:
        wait_for(lambda: (bus.counter("recorded") > 50 and bus.counter("record_bytes") > 0)
                 or ingest.poll() is not None, 20, "recorded frames in ingest's stats")
        assert ingest.poll() is None, ingest.log()
        stats = bus.stats()[-1]     # bytes on disk are updated at each flush (1 s)
        assert stats["record_drops"] == 0 and stats["record_files"] == 1
        assert stats["record_queue"] >= 0
    finally:
        rc = stop_process(ingest)
        bus.close()
    assert rc == 0, ingest.log()
    assert ingest.grep("recorder: closed:")
    h = header(out)
    assert h["symbols"] == PAIRS and sorted(h["precisions"]) == sorted(PAIRS)
    rc, res = verify_cli(out)
    assert rc == 0 and res["checksums"] > 0 and res["mismatch"] == 0, res
    assert res["tx"] > 0 and res["truncated_tail"] == 0


def test_nothing_to_record_exits_1(cfg: Path, work: Path) -> None:
    out = work / "nothing.ndjson"
    p = subprocess.run([sys.executable, "-m", "ingest.record", "--config", str(cfg), "--url",
                        "ws://127.0.0.1:1/v2", "--out", str(out), "--duration", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stderr[-2000:]
    assert p.stdout.startswith(SUMMARY + "0 frames")
    assert read_recording(out).symbols == tuple(PAIRS)   # still a valid (empty) recording


def test_unwritable_path_exits_2(cfg: Path, work: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "ingest.record", "--config", str(cfg),
                        "--out", str(work / "no" / "such" / "dir.ndjson"), "--duration", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "cannot write" in p.stderr, p.stderr
