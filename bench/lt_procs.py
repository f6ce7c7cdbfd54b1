"""Process plumbing for bench/loadtest.py: children, /proc sampling, configs, recordings.

Every child is started through `Children.spawn` (stderr to a log file in the bench's
temp dir, stdout to a file or a pipe) and stopped by `Children.stop_all` (SIGTERM, then
SIGKILL after a grace period), so nothing outlives the load test. A sampler thread reads
`/proc/<pid>/status` (VmRSS) and `/proc/<pid>/stat` (utime + stime) of every live child
twice a second; psutil is not a dependency.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec
import zmq

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
CACHE = Path(tempfile.gettempdir()) / "krakenfeed-bench-recordings"


# --------------------------------------------------------------------------------------
# /proc

def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_s(pid: int) -> float | None:
    """utime + stime of a process in seconds (/proc/<pid>/stat fields 14 and 15)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------------------
# children

class Child:
    def __init__(self, role: str, popen: subprocess.Popen, log: Path) -> None:
        self.role = role
        self.popen = popen
        self.pid = popen.pid
        self.log = log
        self.peak_rss_kb = 0
        self.last_rss_kb = 0

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu(self) -> float:
        return cpu_s(self.pid) or 0.0

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


def _sched_idle() -> None:
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


class Children:
    """Owns every process the load test starts; samples RSS and CPU while they run."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[Child] = []
        self.samples: list[tuple[float, str, int, float]] = []  # (t, role, rss_kb, cpu_s)
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()

    def spawn(self, role: str, args: list[str], *, stdout_pipe: bool = False,
              idle: bool = False) -> Child:
        """Start `python args...`; `idle`: SCHED_IDLE (runs only on otherwise idle CPU)."""
        n = sum(1 for c in self.children if c.role == role)
        log = self.workdir / f"{role}{n or ''}.log"
        err = open(log, "wb")  # noqa: SIM115 - closed by the child's exit (Popen dup'ed it)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("KRAKENFEED_CONFIG", None)
        p = subprocess.Popen([PY, *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE if stdout_pipe else err, stderr=err,
                             start_new_session=True,
                             preexec_fn=_sched_idle if idle else None)
        err.close()
        c = Child(role, p, log)
        with self._lock:
            self.children.append(c)
        return c

    def stop(self, c: Child, grace: float = 5.0) -> int | None:
        if c.popen.poll() is None:
            try:
                c.popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                c.popen.wait(grace)
            except subprocess.TimeoutExpired:
                c.popen.kill()
                c.popen.wait(5)
        if c.popen.stdout is not None:
            c.popen.stdout.close()
        return c.popen.returncode

    def stop_all(self) -> None:
        for c in reversed(self.children):
            self.stop(c, grace=3.0)
        self._stop.set()
        self._thread.join(2)

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            t = time.monotonic() - self.t0
            with self._lock:
                live = [c for c in self.children if c.popen.poll() is None]
            for c in live:
                r = rss_kb(c.pid)
                if r is None:
                    continue
                c.last_rss_kb = r
                c.peak_rss_kb = max(c.peak_rss_kb, r)
                self.samples.append((t, c.role, r, cpu_s(c.pid) or 0.0))


def wait_for_line(child: Child, needle: str, timeout: float) -> str:
    """Poll a child's log for a line containing `needle`; returns that line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in child.log_text().splitlines():
            if needle in line:
                return line
        if not child.alive():
            raise RuntimeError(f"{child.role} exited ({child.popen.returncode}): "
                               f"{child.log_text()[-800:]}")
        time.sleep(0.05)
    raise TimeoutError(f"{child.role}: no {needle!r} within {timeout:g} s: "
                       f"{child.log_text()[-800:]}")


# --------------------------------------------------------------------------------------
# the subscriber's control socket

class SubscriberClient:
    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PAIR)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def request(self, timeout: float = 15.0, **req) -> dict:
        self.sock.send(msgspec.json.encode(req))
        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError(f"subscriber did not answer {req.get('cmd')!r}")
        return msgspec.json.decode(self.sock.recv())

    def get(self, **kw) -> dict:
        return self.request(cmd="get", **kw)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


# --------------------------------------------------------------------------------------
# config

def bench_config(path: Path, run_dir: Path, ns: str, pairs: list[str], depth: int,
                 ports: list[int]) -> None:
    """The bench config: shipped defaults, except namespace, run dir, ports, liveness.

    Liveness is generous and reconnects are quick: the load test restarts the replay
    server between steps (its --speed is fixed per process), and ingest must come back at
    once. Stats every second, so the subscriber sees bookd's and ingest's counters.
    """
    q = msgspec.json.encode
    path.write_text(f"""# written by bench/loadtest.py
[system]
namespace = "{ns}"
run_dir = {q(str(run_dir)).decode()}
log_level = "INFO"

[trading]
pairs = {q(pairs).decode()}

[data_ingestor]
book_depth = {depth}
connection_timeout_s = 10.0
max_message_interval_s = 60.0
max_heartbeat_interval_s = 60.0
reconnect_delay_s = 0.05
max_reconnect_delay_s = 0.2
max_reconnect_attempts = 100000
ohlc_intervals = []               # the recordings carry book frames only (see loadtest.py)

[ingest]
snapshot_timeout_s = 30.0
book_silence_s = 600.0
requests_per_s = 50.0
symbols_per_request = 100
healthy_after_s = 1.0

[bookd]
stale_after_s = 600.0
stats_interval_s = 1.0

[bus]
json_port = {ports[0]}
msgpack_port = {ports[1]}
cache_port = {ports[2]}
stats_interval_s = 1.0

[replay]
host = "127.0.0.1"
port = {ports[3]}
control_port = {ports[4]}
rate_burst = 100
rate_per_s = 100.0
""")


def new_namespace() -> str:
    return "kfb" + secrets.token_hex(4)


# --------------------------------------------------------------------------------------
# recordings

class Recording:
    def __init__(self, name: str, path: Path, symbols: list[str], depth: int, rate: float,
                 book_msgs: int) -> None:
        self.name = name
        self.path = path
        self.symbols = symbols
        self.depth = depth
        self.rate = rate              # book messages per second of recording time
        self.book_msgs = book_msgs    # update frames (plus one snapshot per symbol)


def recording_args(pairs: int, depth: int, rate: float, msgs: int, seed: int = 1) -> list[str]:
    who = ["--symbols", "BTC/USD"] if pairs == 1 else ["--pairs", str(pairs)]
    return [*who, "--depth", str(depth), "--rate", f"{rate:g}", "--duration",
            f"{msgs / rate:g}", "--seed", str(seed), "--trade-ratio", "0", "--kraken-order",
            "--no-heartbeats", "--quiet"]


def make_recordings(specs: dict[str, tuple[int, int, float, int]], children: Children,
                    log=print) -> dict[str, Recording]:  # noqa: ANN001
    """Generate (or reuse, same args and same generator) the synthetic recordings.

    `specs`: name -> (pairs, depth, rate, book messages). Generated in parallel child
    processes into a cache dir; a recording is reused when its args and the bytes of
    the generator (replay/synthetic/*.py) are unchanged (the writer is deterministic).
    """
    CACHE.mkdir(parents=True, exist_ok=True)
    gen = hashlib.sha1()
    for src in sorted((ROOT / "replay" / "synthetic").glob("*.py")):
        gen.update(src.read_bytes())
    gen_hash = gen.hexdigest()[:8]
    out: dict[str, Recording] = {}
    pending = []
    for name, (pairs, depth, rate, msgs) in specs.items():
        args = recording_args(pairs, depth, rate, msgs)
        key = hashlib.sha1((" ".join(args) + gen_hash).encode()).hexdigest()[:10]
        path = CACHE / f"{name}-{key}.ndjson"
        symbols = ["BTC/USD"] if pairs == 1 else [f"SYN{i}/USD" for i in range(1, pairs + 1)]
        out[name] = Recording(name, path, symbols, depth, rate, msgs)
        if path.exists():
            log(f"  recording {name}: cached {path}")
            continue
        tmp = path.with_suffix(".tmp")
        c = children.spawn("synthetic", ["-m", "replay.synthetic", *args, "--out", str(tmp)])
        pending.append((name, c, tmp, path))
    for name, c, tmp, path in pending:
        rc = c.popen.wait()
        if rc != 0:
            raise RuntimeError(f"replay.synthetic failed for {name}: {c.log_text()[-500:]}")
        tmp.rename(path)
        log(f"  recording {name}: {c.log_text().strip().splitlines()[-1]}")
    return out


def machine_info() -> dict:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory": mem,
            "python": sys.version.split()[0], "loadavg_start": list(os.getloadavg())}
