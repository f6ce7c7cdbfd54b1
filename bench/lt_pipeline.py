"""One load-test scenario: the real processes on one config, driven step by step.

A `Pipeline` starts bus, bookd, the subscriber (bench/subscriber.py) and ingest on a
bench config (lt_procs.bench_config), then runs a `burst` (one pass of the recording at
`--speed max`, see its docstring) and *steps*. The subscriber connects to the bus's ipc
endpoint, as a co-located strategy would (`sub_transport="tcp"`: 127.0.0.1 instead).
A step starts the replay server on the scenario's port with one recording at one
`--speed` (`--loop`, so a short recording covers any duration), waits for ingest's new
connection to deliver events, warms up, opens a measurement window of `seconds`, then
arms the replay fault `stall` (no more data frames; nothing in flight is lost), reads
the server's final `data_frames` counter, waits until the subscriber has drained, and
stops the server. ingest reconnects to the next step's server within ~0.2 s.

Per step:

* `sent`: book frames the server sent on that connection (`status` counter
  `data_frames`; the recordings carry book frames only) - `received`: L2 events the
  subscriber got with that connection's `conn_id` = `lost_frames`; `seq_gaps`: messages
  missing by the bus's per-topic `seq`; `lost` = lost_frames + seq_gaps (the issue's
  definition; both are 0 in a clean step).
* `offered_msgs_per_s`: server frames/s in the window; `delivered_msgs_per_s`: events/s
  the subscriber received in the window; latency percentiles of the window.
* `cpu_us_per_msg`: CPU time of each process in the window per delivered message.
* `held`: lost == 0, mismatches == 0, delivered >= 95% of the nominal rate and a
  backlog (sent - received when the window closes) under 0.25 s of traffic: the
  pipeline kept up, it did not just queue.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from lt_procs import (
    Child,
    Children,
    Recording,
    SubscriberClient,
    bench_config,
    free_ports,
    new_namespace,
    wait_for_line,
)

from ingest.config import load_config
from replay.control import ReplayControl

ROLES = ("replay", "ingest", "bookd", "bus", "subscriber")


class Pipeline:
    def __init__(self, children: Children, name: str, symbols: list[str], depth: int,
                 log=print, sub_transport: str = "ipc",  # noqa: ANN001
                 direct_books: bool = False) -> None:
        self.children = children
        self.name = name
        self.symbols = symbols
        self.depth = depth
        self.log = log
        self.ns = new_namespace()
        self.run_dir = Path(tempfile.mkdtemp(prefix="kfb"))
        self.ports = free_ports(5)
        self.cfg = self.run_dir / "bench.toml"
        bench_config(self.cfg, self.run_dir, self.ns, symbols, depth, self.ports)
        self.url = f"ws://127.0.0.1:{self.ports[3]}/v2"
        self.sub_endpoint = (load_config(self.cfg).ipc("bus.json") if sub_transport == "ipc"
                             else f"tcp://127.0.0.1:{self.ports[0]}")
        # The experiment of bench/bookd_direct.py: bookd publishes book events itself.
        self.direct_books = (f"ipc://{self.run_dir}/{self.ns}.books.direct"
                             if direct_books else "")
        self.procs: dict[str, Child] = {}
        self.sub: SubscriberClient | None = None
        self.steps: list[dict] = []
        self.replay: Child | None = None
        self.t_start = 0.0

    # -- life cycle --------------------------------------------------------------------
    def start(self) -> None:
        c, cfg = self.children, str(self.cfg)
        self.t_start = time.monotonic() - c.t0
        self.procs["bus"] = c.spawn("bus", ["-m", "bus", "--config", cfg])
        if self.direct_books:
            self.procs["bookd"] = c.spawn("bookd", ["bench/bookd_direct.py", "--config", cfg,
                                                    "--pub", self.direct_books])
        else:
            self.procs["bookd"] = c.spawn("bookd", ["-m", "bookd", "--config", cfg])
        ctl = f"ipc://{self.run_dir}/sub.ctl"
        direct = ["--endpoint", self.direct_books] if self.direct_books else []
        self.procs["subscriber"] = c.spawn("subscriber", [
            "bench/subscriber.py", "--endpoint", self.sub_endpoint, *direct,
            "--control", ctl, "--check-every", "16"])
        self.sub = SubscriberClient(ctl)
        deadline = time.monotonic() + 30
        while "bus" not in self.sub.get()["stats"]:   # the SUB is connected and subscribed
            if time.monotonic() > deadline:
                raise TimeoutError("the subscriber saw no stats from the bus within 30 s")
            time.sleep(0.1)
        self.procs["ingest"] = c.spawn("ingest", ["-m", "ingest", "--config", cfg,
                                                  "--url", self.url])

    def stop(self) -> dict:
        """Fresh counters of every process, then stop them all."""
        final = {}
        if self.sub is not None:
            try:
                t = time.time_ns()
                deadline = time.monotonic() + 2.5
                while time.monotonic() < deadline:   # stats are published every second
                    g = self.sub.get()
                    if all(g["stats"].get(p, {}).get("at_ns", 0) > t
                           for p in ("bookd", "ingest", "bus")):
                        break
                    time.sleep(0.1)
                final = {p: s["counters"] for p, s in g["stats"].items()}
                final["subscriber"] = {k: g[k] for k in (
                    "total", "snapshots", "checked", "mismatches", "seq_gaps", "seq_jumps",
                    "bad", "cpu_s")}
                self.buckets = self.sub.get(buckets=True)["buckets"]
                self.sub.request(cmd="stop", timeout=5)
            except (TimeoutError, KeyError) as e:
                self.log(f"  {self.name}: could not read final counters: {e}")
                self.buckets = []
            self.sub.close()
            self.sub = None
        if self.replay is not None:
            self.children.stop(self.replay)
        for role in ("ingest", "bookd", "bus", "subscriber"):
            if role in self.procs:
                self.children.stop(self.procs[role])
        self.peak_rss_kb = {r: p.peak_rss_kb for r, p in self.procs.items()}
        self.peak_rss_kb["replay"] = max((s.get("replay_peak_rss_kb", 0) for s in self.steps),
                                         default=0)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return final

    # -- one step ------------------------------------------------------------------------
    def _start_replay(self, rec: Recording, speed: str, loop: bool) -> tuple[Child, str]:
        args = ["-m", "replay", "--config", str(self.cfg), "--file", str(rec.path),
                "--speed", speed, "--port", str(self.ports[3]), "--control-port", "0"]
        if loop:
            args.append("--loop")
        # At a fixed speed the replay server busy-waits between frames (uvloop's timers
        # have 1 ms resolution; a sub-ms call_later fires at once), burning a core of this
        # 2-core VM. Under SCHED_IDLE the load generator only takes CPU the pipeline leaves
        # idle (Kraken's servers cost this machine nothing either); if that is too little
        # to send the nominal rate, the step shows it (offered < nominal, not held).
        idle = speed != "max" and os.environ.get("KFB_REPLAY_SCHED", "idle") == "idle"
        child = self.children.spawn("replay", args, idle=idle)
        line = wait_for_line(child, "listening on", 120)
        endpoint = line.split("(control ", 1)[1].rstrip(")").strip()
        return child, endpoint

    def _new_conn(self, seen: set) -> str:
        """The first connection, not in `seen`, whose events reach the subscriber."""
        deadline = time.monotonic() + 60
        while True:
            g = self.sub.get()
            new = [k for k, v in g["per_conn"].items() if k not in seen and v[0] > 0]
            if new:
                return new[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no events from a new connection within 60 s "
                                   f"(ingest log: {self.procs['ingest'].log_text()[-600:]})")
            time.sleep(0.05)

    def _wait_quiet(self, conn: str, timeout_s: float, quiet_s: float) -> tuple[bool, dict]:
        """Wait until the subscriber's event count of connection `conn` has not moved
        for `quiet_s`. Returns whether it did before `timeout_s` ran out (drained), and
        the subscriber's last counters."""
        last, quiet_since = -1, time.monotonic()
        deadline = time.monotonic() + timeout_s
        while True:
            g = self.sub.get()
            n = g["per_conn"][conn][0]
            if n != last:
                last, quiet_since = n, time.monotonic()
            elif time.monotonic() - quiet_since > quiet_s:
                return True, g
            if time.monotonic() >= deadline:
                return False, g
            time.sleep(0.05)

    def step(self, label: str, rec: Recording, speed: float | None, seconds: float, *,
             nominal: float | None, warmup: float = 0.5, raw: bool = False,
             reader_s: float = 0.0, loop: bool = True, hook=None,  # noqa: ANN001
             drain_s: float = 30.0) -> dict:
        assert self.sub is not None
        sub = self.sub
        g0 = sub.get()
        seen = set(g0["per_conn"])
        spd = "max" if speed is None else f"{speed:g}"
        t_begin = time.monotonic() - self.children.t0
        replay, endpoint = self._start_replay(rec, spd, loop)
        self.replay = replay
        rc = ReplayControl(endpoint, timeout_s=10)
        res: dict = {"label": label, "scenario": self.name, "speed": spd,
                     "nominal_msgs_per_s": nominal, "seconds": seconds}
        try:
            conn = self._new_conn(seen)
            time.sleep(warmup)
            procs = {"replay": replay, **self.procs}
            cpu0 = {r: p.cpu() for r, p in procs.items()}
            s0 = rc.status()["counters"]
            t0 = time.monotonic()
            n0 = sub.request(cmd="window", on=True, conn=int(conn))["per_conn"][conn][0]
            t_win = time.monotonic() - self.children.t0
            t_win_unix = time.time_ns()
            if hook is not None:          # e.g. start profilers on these processes
                hook(procs)
            time.sleep(seconds)
            s1 = rc.status()["counters"]
            t1 = time.monotonic()
            w = sub.request(cmd="window", on=False, raw=raw)
            # bookd's publish lag (ingest receive -> shared memory, no bus hop) over its
            # last stats interval (1 s here), if that interval lies within the window
            bstats = w.get("stats", {}).get("bookd", {})
            gauges = (bstats.get("gauges", {})
                      if bstats.get("at_ns", 0) >= t_win_unix + 1_000_000_000 else {})
            cpu1 = {r: p.cpu() for r, p in procs.items()}
            if reader_s:
                res["reader"] = self._reader(reader_s)
            rc.fault("stall")
            s2 = rc.status()["counters"]
            res["drained"], g = self._wait_quiet(conn, drain_s, 0.4)
            res["drain_s"] = round(time.monotonic() - t1, 2)
        finally:
            rc.close()
            res["replay_peak_rss_kb"] = replay.peak_rss_kb
            self.children.stop(replay)
            self.replay = None
        win = w["window"]
        dt = t1 - t0
        sent = s2["data_frames"]
        received = g["per_conn"][conn][0]
        n1 = w["per_conn"][conn][0]
        delivered = (n1 - n0) / dt
        backlog = s1["data_frames"] - n1   # sent but not yet at the subscriber, at t1
        res.update({
            "conn_id": conn, "sent": sent, "received": received,
            "lost_frames": sent - received,
            "seq_gaps": g["seq_gaps"] - g0["seq_gaps"],
            "mismatches": g["mismatches"] - g0["mismatches"],
            "checked": g["checked"] - g0["checked"],
            "source_checksum_mismatches": s2.get("source_checksum_mismatches", 0),
            "offered_msgs_per_s": (s1["data_frames"] - s0["data_frames"]) / dt,
            "delivered_msgs_per_s": delivered,
            "latency": {k: v for k, v in win.items() if k != "hist_log10_us"},
            "hist_log10_us": win.get("hist_log10_us"),
            "publish_lag_us": {k[len("publish_lag_"):]: v for k, v in gauges.items()
                               if k.startswith("publish_lag_")},
            "backlog_at_end": backlog,
            "cpu_us_per_msg": {r: (cpu1[r] - cpu0[r]) * 1e6 / max(1, n1 - n0) for r in cpu0},
            "cpu_share": {r: (cpu1[r] - cpu0[r]) / dt for r in cpu0},
            "t_begin": t_begin, "t_window": t_win, "t_window_unix": t_win_unix, "t_end": time.monotonic() - self.children.t0,
        })
        res["lost"] = max(0, res["lost_frames"]) + res["seq_gaps"]
        if raw:
            res["raw_us"] = w.get("raw_us", [])
        res["held"] = (res["lost"] == 0 and res["mismatches"] == 0
                       and res["source_checksum_mismatches"] == 0
                       and nominal is not None and delivered >= 0.95 * nominal
                       and backlog <= 0.25 * nominal)
        self.steps.append(res)
        lat = res["latency"]
        self.log(f"  {self.name:<8} {label:<10} offered {res['offered_msgs_per_s']:>9,.0f}/s "
                 f"delivered {delivered:>9,.0f}/s  sent {sent:>8,} lost {res['lost']:>7,} "
                 f"mism {res['mismatches']}  p50 {lat.get('p50_us', 0):>8,.0f} us "
                 f"p99 {lat.get('p99_us', 0):>9,.0f} us"
                 f"{'  HELD' if res['held'] else ''}")
        return res

    def burst(self, rec: Recording, drain_s: float = 60.0) -> dict:
        """One pass of the recording at `--speed max` (no loop): the burst ceiling.

        The server writes the whole recording as fast as ingest reads it (TCP flow
        control); every internal queue may fill and drop. `delivered_msgs_per_s` is the
        subscriber's rate from the connection's first to its last event; `lost` what
        never arrived (sent - received, plus seq gaps) once the pipeline has drained;
        latency percentiles cover every event of the burst (they include its queueing).
        """
        assert self.sub is not None
        sub = self.sub
        g0 = sub.get()
        seen = set(g0["per_conn"])
        t_begin = time.monotonic() - self.children.t0
        procs = dict(self.procs)
        cpu0 = {r: p.cpu() for r, p in procs.items()}
        sub.request(cmd="window", on=True)      # every connection: only this one is live
        t_win_unix = time.time_ns()
        replay, endpoint = self._start_replay(rec, "max", loop=False)
        self.replay = replay
        rc = ReplayControl(endpoint, timeout_s=10)
        res: dict = {"label": "max", "scenario": self.name, "speed": "max",
                     "nominal_msgs_per_s": None, "seconds": 0.0, "frames_in_recording":
                     rec.book_msgs + len(rec.symbols)}
        try:
            conn = self._new_conn(seen)
            t_conn = time.monotonic()
            res["drained"], g = self._wait_quiet(conn, drain_s, 0.5)  # the pass, then the drain
            rc.fault("stall")
            s2 = rc.status()["counters"]
            w = sub.request(cmd="window", on=False)
            cpu1 = {r: p.cpu() for r, p in procs.items()}
            res["pass_s"] = round(time.monotonic() - t_conn, 2)
        finally:
            rc.close()
            res["replay_peak_rss_kb"] = replay.peak_rss_kb
            self.children.stop(replay)
            self.replay = None
        count, first, last_ns = g["per_conn"][conn]
        span = max(1e-9, (last_ns - first) / 1e9)
        sent = s2["data_frames"]
        res.update({
            "conn_id": conn, "sent": sent, "received": count,
            "lost_frames": sent - count,
            "seq_gaps": g["seq_gaps"] - g0["seq_gaps"],
            "mismatches": g["mismatches"] - g0["mismatches"],
            "checked": g["checked"] - g0["checked"],
            "source_checksum_mismatches": s2.get("source_checksum_mismatches", 0),
            "offered_msgs_per_s": None, "delivered_msgs_per_s": (count - 1) / span,
            "seconds": span, "backlog_at_end": None,
            "latency": {k: v for k, v in w["window"].items() if k != "hist_log10_us"},
            "cpu_us_per_msg": {r: (cpu1[r] - cpu0[r]) * 1e6 / max(1, count) for r in cpu0},
            "t_begin": t_begin, "t_window_unix": t_win_unix,
            "t_end": time.monotonic() - self.children.t0,
        })
        res["lost"] = max(0, res["lost_frames"]) + res["seq_gaps"]
        res["held"] = False
        self.steps.append(res)
        lat = res["latency"]
        self.log(f"  {self.name:<8} {'max':<10} burst of {sent:,} frames: delivered "
                 f"{res['delivered_msgs_per_s']:>9,.0f}/s over {span:.2f} s, lost "
                 f"{res['lost']:,}, mism {res['mismatches']}, p50 {lat.get('p50_us', 0):,.0f} us"
                 f" p99 {lat.get('p99_us', 0):,.0f} us")
        return res

    def _reader(self, seconds: float) -> dict:
        import json
        c = self.children.spawn("reader", [
            "bench/reader_rate.py", "--namespace", self.ns, "--pair", self.symbols[0],
            "--seconds", f"{seconds:g}"], stdout_pipe=True)
        try:
            out, _ = c.popen.communicate(timeout=seconds + 30)
        except Exception:  # noqa: BLE001 - a reader problem must not stop the load test
            self.children.stop(c)
            return {"error": "reader timed out"}
        try:
            return json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"error": c.log_text()[-300:]}
