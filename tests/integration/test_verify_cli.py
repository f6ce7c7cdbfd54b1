"""`python -m bookd.verify` end to end: the real vectors, broken input, synthetic markets.

Each test runs the CLI as a subprocess, the way a person would, and reads the JSON
object that must be the last line of all its output (stdout and stderr together).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VECTORS = Path(os.environ.get("KRAKENFEED_VECTORS", ROOT.parent / "shared" / "kraken" / "vectors"))
CAPTURE = VECTORS / "depthcharge_kraken_minagbp_d25_20260816.ndjson"
SDK = VECTORS / "python_kraken_sdk_orderbook_v2_btcusd.jsonl"
JSONL = sorted(VECTORS.glob("*.jsonl"))

pytestmark = pytest.mark.skipif(not CAPTURE.exists(), reason=f"{VECTORS} not found")


def run(*args: str | Path, module: str = "bookd.verify") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def verify(*args: str | Path) -> tuple[int, dict, subprocess.CompletedProcess]:
    """Run the verifier; the JSON must be the last line of stdout+stderr combined."""
    p = subprocess.run([sys.executable, "-m", "bookd.verify", *map(str, args)], cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    lines = p.stdout.rstrip("\n").splitlines()
    assert lines, p.stdout
    return p.returncode, json.loads(lines[-1]), p


def assert_input_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stdout == ""
    err = p.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_all_vectors_in_one_invocation() -> None:
    rc, out, p = verify(CAPTURE, *JSONL, "--precision", "MINA/GBP=4/8")
    assert rc == 0, p.stdout
    assert (out["checksums"], out["ok"], out["mismatch"]) == (543, 543, 0)
    assert out["mismatches"] == []
    assert out["frames"] == 606 and out["tx"] == 1
    assert out["symbols"]["MINA/GBP"] == {**out["symbols"]["MINA/GBP"], "checksums": 30,
                                          "ok": 30, "depth": 25, "price_precision": 4,
                                          "qty_precision": 8}
    assert out["symbols"]["BTC/USD"]["checksums"] == 511
    assert out["symbols"]["BTC/USD"]["price_precision"] == 1
    assert out["symbols"]["MATIC/USD"]["ok"] == 2
    assert "OK: all 543 checksums match" in p.stdout
    assert p.stdout.count('{"frames"') == 1  # one summary for all files


def test_vectors_with_global_precision_flags() -> None:
    # flags apply to every file, so the capture (no precisions) runs on its own ...
    rc, out, _ = verify(CAPTURE, "--price-precision", "4", "--qty-precision", "8")
    assert rc == 0 and (out["checksums"], out["ok"]) == (30, 30)
    assert out["symbols"]["MINA/GBP"]["depth"] == 25  # from the header (the ack agrees)
    assert out["channels"]["heartbeat"] == 60 and out["channels"]["ack:subscribe"] == 1
    # ... and the three message files together, each with its _meta
    rc, out2, _ = verify(*JSONL)
    assert rc == 0 and (out2["checksums"], out2["ok"], out2["mismatch"]) == (513, 513, 0)
    assert out["checksums"] + out2["checksums"] == 543


def test_a_corrupted_checksum_is_exactly_one_mismatch(tmp_path: Path) -> None:
    lines = SDK.read_bytes().splitlines(keepends=True)
    target = 237  # the line with a repeated price, mid-file
    old = json.loads(lines[target - 1])["data"][0]["checksum"]
    lines[target - 1] = lines[target - 1].replace(b'"checksum":%d' % old,
                                                  b'"checksum":%d' % ((old + 1) % 2**32))
    bad = tmp_path / "corrupt.jsonl"
    bad.write_bytes(b"".join(lines))
    rc, out, p = verify(bad)
    assert rc == 1
    assert (out["checksums"], out["mismatch"], out["ok"]) == (510, 1, 509)
    (m,) = out["mismatches"]
    assert m == {"file": str(bad), "line": target, "symbol": "BTC/USD",
                 "expected": (old + 1) % 2**32, "computed": old}
    assert f"{bad}:{target}" in p.stdout


def test_a_lost_level_shows_until_the_next_snapshot(tmp_path: Path) -> None:
    lines = SDK.read_bytes().splitlines(keepends=True)
    meta, snap, updates = lines[0], lines[1], lines[2:12]
    lost = updates[0].replace(b'{"price":29431.1,"qty":0.0},', b"")  # a lost delete
    assert lost != updates[0]
    # the book stays wrong (a stale ask) until the snapshot that follows replays it all
    bad = tmp_path / "lost.jsonl"
    bad.write_bytes(b"".join([meta, snap, lost, *updates[1:], snap, *updates]))
    rc, out, _ = verify(bad)
    assert rc == 1 and out["checksums"] == 22
    lines_bad = [m["line"] for m in out["mismatches"]]
    assert lines_bad[0] == 3 and len(lines_bad) >= 2 and max(lines_bad) <= 12
    assert out["mismatch"] == len(lines_bad) and out["ok"] == 22 - len(lines_bad)
    assert out["symbols"]["BTC/USD"]["snapshots"] == 2


def test_unreadable_input_exits_2(tmp_path: Path) -> None:
    broken = tmp_path / "broken.ndjson"
    data = CAPTURE.read_bytes().splitlines(keepends=True)
    n = next(i for i, line in enumerate(data) if i > 5 and b'"type":"update"' in line)
    data[n] = data[n][:120] + b"\n"  # a line that is not one JSON value, mid-file
    broken.write_bytes(b"".join(data))
    assert_input_error(run(broken, "--precision", "MINA/GBP=4/8"), str(broken),
                       f"line {n + 1}:", "not one JSON value")

    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    assert_input_error(run(binary), str(binary), "binary")

    missing = tmp_path / "nope.ndjson"
    assert_input_error(run(CAPTURE, missing, "--price-precision", "4", "--qty-precision", "8"),
                       str(missing), "cannot open")

    part = tmp_path / "part.ndjson"  # a rotated part's "continues" must be a file name
    part.write_text('{"format":"krakenfeed-recording","version":1,"symbols":["A/B"],'
                    '"depth":10,"precisions":{"A/B":[1,8]},"continues":7}\n')
    assert_input_error(run(part), str(part), "continues must be the file name")


def test_unknown_precision_names_symbol_and_flags() -> None:
    p = run(CAPTURE)
    assert_input_error(p, "MINA/GBP", "--price-precision", "--qty-precision", "line 5")


def test_nothing_checked_is_a_failure(tmp_path: Path) -> None:
    f = tmp_path / "quiet.ndjson"
    f.write_bytes(b"".join(line for line in CAPTURE.read_bytes().splitlines(keepends=True)
                           if b'"channel":"book"' not in line))
    rc, out, p = verify(f, "--price-precision", "4", "--qty-precision", "8")
    assert rc == 1 and out["checksums"] == 0
    assert "no checksum was checked" in p.stdout


def test_gz_raw_b64_and_truncated_tail(tmp_path: Path) -> None:
    lines = CAPTURE.read_bytes().splitlines(keepends=True)
    raw = b'{"rx_ns": 1, "raw_b64": "AAEC"}\n'
    body = b"".join([*lines[:6], raw, *lines[6:]]) + b'{"rx_ns": 2, "frame": {"chan'
    gz = tmp_path / "cap.ndjson.gz"
    gz.write_bytes(gzip.compress(body))
    rc, out, p = verify(gz, "--precision", "MINA/GBP=4/8")
    assert rc == 0, p.stdout
    assert out["checksums"] == 30 and out["raw_b64"] == 1 and out["truncated_tail"] == 1


@pytest.mark.parametrize("gen_args", [
    ["--pairs", "3", "--seed", "1", "--depth", "10"],
    ["--symbols", "BTC/USD,ETH/USD,PEPE/USD", "--seed", "2", "--depth", "25", "--kraken-order",
     "--intervals", "1m,5m", "--status-prob", "0.01"],
    ["--pairs", "5", "--seed", "3", "--depth", "100", "--extreme"],
    ["--symbols", "SHIB/USD,XRP/USD", "--seed", "4", "--depth", "500",
     "--precision", "XRP/USD=4/2"],
])
def test_synthetic_recordings_verify(tmp_path: Path, gen_args: list[str]) -> None:
    out_path = tmp_path / ("m.ndjson.gz" if "--extreme" in gen_args else "m.ndjson")
    g = run(*gen_args, "--rate", "500", "--duration", "4", "--out", out_path,
            module="replay.synthetic")
    assert g.returncode == 0, g.stderr
    assert g.stdout.startswith(f"replay.synthetic: wrote {out_path}: ")
    n_pairs = len(json.loads(gzip.open(out_path).readline() if out_path.suffix == ".gz"
                             else out_path.open("rb").readline())["symbols"])
    rc, out, p = verify(out_path)
    assert rc == 0, p.stdout
    assert out["mismatch"] == 0 and out["checksums"] == out["ok"] == 2000 + n_pairs
    assert out["channels"]["trade"] > 0 and out["channels"]["ohlc"] > 0
    depth = int(gen_args[gen_args.index("--depth") + 1])
    assert {s["depth"] for s in out["symbols"].values()} == {depth}
    if "--precision" in gen_args:
        assert out["symbols"]["XRP/USD"]["price_precision"] == 4
        assert out["symbols"]["XRP/USD"]["qty_precision"] == 2
    # the same arguments give the same bytes
    again = tmp_path / ("again" + "".join(out_path.suffixes))
    assert run(*gen_args, "--rate", "500", "--duration", "4", "--out", again, "--quiet",
               module="replay.synthetic").returncode == 0
    opener = gzip.open if out_path.suffix == ".gz" else open
    with opener(out_path, "rb") as a, opener(again, "rb") as b:
        assert a.read() == b.read()


def test_resubscribe_mid_file_and_instrument_precisions(tmp_path: Path) -> None:
    lines = CAPTURE.read_bytes().splitlines(keepends=True)
    books = [ln for ln in lines if b'"frame": {"channel":"book"' in ln]
    snap, updates = books[0], books[1:]
    unsub = (b'{"rx_ns": 1, "frame": {"method":"unsubscribe","result":{"channel":"book",'
             b'"depth":25,"symbol":"MINA/GBP"},"success":true}}\n')
    instrument = (b'{"rx_ns": 1, "frame": {"channel":"instrument","type":"snapshot","data":'
                  b'{"assets":[],"pairs":[{"symbol":"MINA/GBP","base":"MINA","quote":"GBP",'
                  b'"status":"online","qty_precision":8,"qty_increment":1e-08,'
                  b'"price_precision":4,"price_increment":0.0001,"qty_min":5e-05}]}}}\n')
    # precisions from the instrument frame; an update after the unsubscribe has no book
    # (skipped); the snapshot of the resubscribe replaces the book and all verifies
    body = [lines[0], instrument, *lines[1:], unsub, updates[0], snap, *updates]
    f = tmp_path / "resub.ndjson"
    f.write_bytes(b"".join(body))
    rc, out, p = verify(f)
    assert rc == 0, p.stdout
    sym = out["symbols"]["MINA/GBP"]
    assert (sym["checksums"], sym["ok"], sym["skipped"], sym["snapshots"]) == (60, 60, 1, 2)
    assert (sym["price_precision"], sym["qty_precision"], sym["depth"]) == (4, 8, 25)
    assert out["channels"]["ack:unsubscribe"] == 1 and out["channels"]["instrument"] == 1


def test_synthetic_recording_without_header_precisions(tmp_path: Path) -> None:
    rec = tmp_path / "s.ndjson"
    assert run("--symbols", "BTC/USD,PEPE/USD", "--rate", "200", "--duration", "3",
               "--out", rec, "--quiet", module="replay.synthetic").returncode == 0
    first, rest = rec.read_bytes().split(b"\n", 1)
    header = json.loads(first)
    del header["precisions"], header["depth"]
    f = tmp_path / "noprec.ndjson"
    f.write_bytes(json.dumps(header).encode() + b"\n" + rest)
    rc, out, p = verify(f)  # precisions from the instrument snapshot, depth from the ack
    assert rc == 0, p.stdout
    assert out["symbols"]["PEPE/USD"]["price_precision"] == 9
    assert out["symbols"]["BTC/USD"]["depth"] == 10 and out["checksums"] == 602
