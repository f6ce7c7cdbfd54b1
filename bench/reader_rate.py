"""Reader snapshots/s against a live bookd under load (run by bench/loadtest.py).

    python bench/reader_rate.py --namespace NS --pair P [--seconds 2]

Attaches `bookd.reader.BookReader` to the pair's shared-memory book and calls
`snapshot()` in a loop for `--seconds`, while bookd keeps publishing. Every snapshot is
checked: its CRC32, recomputed from the copied tick arrays (`bookd.checksum`), must
equal the checksum bookd stored with it; a difference would be a torn copy accepted.
Prints one JSON object: snapshots, snapshots_per_s, distinct seqlock values seen
(how many different book versions were read), torn, seqlock retries, and how many
snapshots showed each book state (`valid`, `stale`, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bookd.checksum import checksum_levels  # noqa: E402
from bookd.layout import BookState  # noqa: E402
from bookd.reader import BookReader  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--pair", required=True)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args(argv)
    with BookReader.attach(args.pair, timeout=10, namespace=args.namespace) as r:
        n = valid = torn = checked = 0
        seqs: set[int] = set()
        states: dict[BookState, int] = {}
        t0 = time.perf_counter()
        end = t0 + args.seconds
        snap = r.snapshot
        while True:
            for _ in range(64):
                s = snap()
                n += 1
                states[s.state] = states.get(s.state, 0) + 1
                if s.state is BookState.VALID:
                    valid += 1
                    if n % 16 == 0:   # the CRC from ticks costs more than the copy
                        checked += 1
                        seqs.add(s.seq)
                        crc = checksum_levels(s.asks.tolist(), s.bids.tolist())
                        if crc != s.checksum:
                            torn += 1
            if time.perf_counter() >= end:
                break
        dt = time.perf_counter() - t0
        retries = r.retries
    print(json.dumps({"snapshots": n, "snapshots_per_s": n / dt, "seconds": dt,
                      "valid": valid, "crc_checked": checked, "torn": torn,
                      "versions_seen_in_checked": len(seqs), "seqlock_retries": retries,
                      "states": {st.name.lower(): k for st, k in states.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
