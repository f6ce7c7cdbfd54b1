"""How fast ingest forwards book frames on loopback (issue 10's figure).

The replay server plays a synthetic depth-10 recording at `--speed max` to a real
`python -m ingest`; where bookd would be, a PULL socket counts the book frames ingest
forwards (unwrapping its batches) and checks their per-(connection, pair) sequence
numbers. The rate is frames forwarded per second, first to last frame, plus ingest's
CPU per frame and how many frames each ZMQ message to bookd carried (ingest batches
the frames of one socket read). `--rate N` paces the server at N frames/s instead
(the CPU per frame at a given load). The replay server's own ceiling is
`bench/bench_replay.py`.

    .venv/bin/python bench/bench_ingest.py [--frames 300000] [--pairs 4] [--rate N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zmq  # noqa: E402
from lt_procs import (  # noqa: E402
    Children,
    bench_config,
    free_ports,
    make_recordings,
    new_namespace,
    wait_for_line,
)

from ingest.messages import (  # noqa: E402
    FRAME,
    inner_messages,
    unpack_header,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=300_000, help="book frames in the recording")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--rate", type=float, default=0.0,
                    help="frames/s the server sends (default: as fast as it can)")
    ap.add_argument("--json", action="store_true", help="print a JSON object last")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="kfbi"))
    children = Children(work)
    ns = new_namespace()
    ports = free_ports(5)
    cfg = work / "bench.toml"
    rec = make_recordings({"ingest": (args.pairs, 10, 100_000.0, args.frames)}, children,
                          lambda m: print(m, file=sys.stderr))["ingest"]
    bench_config(cfg, work, ns, rec.symbols, 10, ports)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 0)
    pull.bind(f"ipc://{work}/{ns}.bookd")
    frames = gaps = zmq_msgs = 0
    last_seq: dict[tuple[int, int], int] = {}
    t_first = t_last = 0.0
    result: dict = {}
    try:
        replay = children.spawn("replay", [
            "-m", "replay", "--config", str(cfg), "--file", str(rec.path), "--speed",
            f"{args.rate / rec.rate:g}" if args.rate > 0 else "max",
            "--port", str(ports[3]), "--control-port", "0"])
        wait_for_line(replay, "listening on", 120)
        ingest = children.spawn("ingest", ["-m", "ingest", "--config", str(cfg), "--url",
                                           f"ws://127.0.0.1:{ports[3]}/v2"])
        expected = rec.book_msgs + len(rec.symbols)  # updates plus one snapshot per pair
        deadline = time.monotonic() + 300
        quiet_since = time.monotonic()
        cpu0 = None
        while frames < expected and time.monotonic() < deadline:
            if not pull.poll(200):
                if frames and time.monotonic() - quiet_since > 3:
                    break  # the server sent everything it had
                continue
            msg = pull.recv()
            inner = inner_messages(msg)
            for m in inner:
                kind, pair, conn, seq, _ = unpack_header(m)
                if kind != FRAME:
                    continue
                if not frames:
                    t_first = time.monotonic()
                    cpu0 = ingest.cpu()
                frames += 1
                prev = last_seq.get((conn, pair), 0)
                gaps += seq != prev + 1
                last_seq[conn, pair] = seq
            zmq_msgs += frames > 0  # messages since the first frame
            t_last = quiet_since = time.monotonic()
        cpu = ingest.cpu() - (cpu0 or 0.0)
        dt = max(t_last - t_first, 1e-9)
        result = {"ingest_forwarded_frames": frames, "expected_frames": expected,
                  "ingest_forward_msgs_per_s": round(frames / dt),
                  "ingest_cpu_us_per_frame": round(cpu * 1e6 / max(frames, 1), 2),
                  "frames_per_zmq_msg": round(frames / max(zmq_msgs, 1), 2),
                  "seq_gaps": gaps, "pairs": len(rec.symbols), "rate": args.rate or "max",
                  "loadavg": round(os.getloadavg()[0], 2)}
    finally:
        children.stop_all()
        pull.close(0)
        ctx.term()
        shutil.rmtree(work, ignore_errors=True)
    print(f"ingest forwarded {result['ingest_forwarded_frames']:,} of "
          f"{result['expected_frames']:,} book frames at "
          f"{result['ingest_forward_msgs_per_s']:,} frames/s "
          f"({result['ingest_cpu_us_per_frame']} us CPU per frame, "
          f"{result['frames_per_zmq_msg']} frames per message to bookd, {result['seq_gaps']} "
          f"seq gaps, load {result['loadavg']})")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
