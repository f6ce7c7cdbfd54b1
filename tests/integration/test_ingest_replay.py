"""ingest against the replay server, as in production: `python -m ingest --url ws://...`.

Each test writes its own config (unique namespace, short run dir, free ports, limits
of a second or two: tests/integration/harness.py), binds a FakeBookd and a FakeBus where
bookd and the bus would bind, starts `python -m replay` (a recording or the synthetic
market) and `python -m ingest` as subprocesses, drives faults through the replay
control socket, and checks what reaches the fakes. Waits are bounded by generous
timeouts; nothing asserts how fast anything is, except SIGTERM's "< 3 s".
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import pytest

from bookd.book import Book
from ingest.config import load_config
from ingest.messages import FRAME, ConnectionState, PairInfo, Stale
from ingest.wire import decode_book

from .harness import CAPTURE, FakeBookd, FakeBus, Harness, LoggedPopen, ReplayHandle, wait_for

PAIRS = ("BTC/USD", "ETH/USD", "PEPE/USD")  # synthetic: precisions 1/8, 2/8, 9/8
SYNTH = ("--synthetic", "--speed", "1")  # the live synthetic market, 100 book msgs/s
NO_OHLC = {"ohlc_intervals": []}
SLACK = 4.0  # added to every configured limit when waiting for it to fire


@pytest.fixture
def kf(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    h = Harness(tmp_path)
    failed = request.session.testsfailed
    try:
        yield h
    finally:
        if request.session.testsfailed > failed:
            print(h.logs())  # the processes' stderr, next to the failure
        h.close()


class Live(NamedTuple):
    cfg: Path
    bookd: FakeBookd
    bus: FakeBus
    replay: ReplayHandle
    ingest: LoggedPopen
    conn: int  # the first connection's id (0 when not waited for)


def start(kf: Harness, pairs: tuple[str, ...] = PAIRS, replay_args: tuple[str, ...] = SYNTH,
          *, wait: bool = True, bookd_kw: dict | None = None,
          **overrides: dict[str, Any]) -> Live:
    overrides.setdefault("data_ingestor", dict(NO_OHLC))
    cfg = kf.config(pairs, **overrides)
    bookd = kf.bookd(cfg, **(bookd_kw or {}))
    bus = kf.bus(cfg)
    replay = kf.replay(cfg, *replay_args)
    ingest = kf.ingest(cfg, replay.url)
    conn = 0
    if wait:
        conn = wait_for(bookd.current_conn, 20, "ingest's ConnectionState up")
        wait_for(lambda: bookd.snapshots_of_all(conn), 20, "a snapshot of every pair")
    return Live(cfg, bookd, bus, replay, ingest, conn)


def limits(cfg: Path) -> Any:
    return load_config(cfg)


def check_connection(bookd: FakeBookd, conn: int) -> None:
    """What bookd relies on, for one connection: ConnectionState up first; per pair a
    PairInfo (of this connection) before the pair's first frame, that first frame a
    snapshot, and sequence numbers 1, 2, 3... without a gap."""
    msgs = [m for m in bookd.messages() if m.conn_id == conn]
    assert msgs and isinstance(msgs[0].control, ConnectionState) and msgs[0].control.up
    for i, pair in enumerate(bookd.pairs):
        frames = [k for k, m in enumerate(msgs) if m.kind == FRAME and m.pair_index == i]
        if not frames:
            continue
        infos = [k for k, m in enumerate(msgs)
                 if isinstance(m.control, PairInfo) and m.control.pair == pair]
        assert infos and infos[0] < frames[0], f"{pair}: no PairInfo before its first frame"
        info = msgs[infos[0]].control
        assert (info.conn_id, info.pair_index) == (conn, i)
        assert msgs[frames[0]].is_snapshot, f"{pair}: the first frame is not a snapshot"
        seqs = [msgs[k].seq for k in frames]
        assert seqs == list(range(1, len(seqs) + 1)), f"{pair}: seqs {seqs[:50]}"


def flowing(bookd: FakeBookd, pairs: tuple[str, ...] | list[str], conn: int, since: int,
            n: int = 5) -> bool:
    return all(len(bookd.frames(p, conn, since)) >= n for p in pairs)


def in_order(seq: list[str], wanted: list[str]) -> bool:
    """`wanted` is a subsequence of `seq`."""
    it = iter(seq)
    return all(w in it for w in wanted)


def verify_checksums(bookd: FakeBookd, conn: int) -> int:
    """Apply every forwarded frame of `conn` to a Book at the PairInfo's precisions and
    compare each checksum with the frame's; returns the number of frames checked."""
    infos = {i.pair: i for i in bookd.pair_infos() if i.conn_id == conn}
    checked = 0
    for pair in bookd.pairs:
        info = infos[pair]
        book = Book(pair, info.depth, info.price_precision, info.qty_precision)
        prec = {pair: (info.price_precision, info.qty_precision)}
        for m in bookd.frames(pair, conn):
            for u in decode_book(m.payload, prec):
                assert u.symbol == pair
                assert book.apply(u.snapshot, u.bids, u.asks) == u.checksum, (pair, m.seq)
                checked += 1
    return checked


# -------------------------------------------------------------------------------------
# 1. frames verbatim and in order

def recorded_book_frames() -> list[bytes]:
    """The capture's book frames as exact bytes (msgspec.Raw keeps the original text)."""
    out = []
    with open(CAPTURE, "rb") as f:
        next(f)  # the header
        for line in f:
            rec = msgspec.json.decode(line, type=dict[str, msgspec.Raw])
            frame = bytes(rec["frame"]) if "frame" in rec else b""
            if b'"dir"' not in line and frame.startswith(b'{"channel":"book"'):
                out.append(frame)
    return out


@pytest.mark.skipif(not CAPTURE.exists(), reason=f"{CAPTURE} not found")
def test_capture_frames_forwarded_verbatim_in_order(kf: Harness) -> None:
    recorded = recorded_book_frames()
    assert len(recorded) == 30
    t0 = time.time_ns()
    live = start(kf, ("MINA/GBP",),
                 ("--file", str(CAPTURE), "--price-precision", "4", "--qty-precision", "8",
                  "--speed", "max"),
                 data_ingestor={"book_depth": 25, "ohlc_intervals": []},
                 ingest={"book_silence_s": 60.0})  # the recording ends: no resubscribe
    frames = wait_for(lambda: len(live.bookd.frames()) >= 30 and live.bookd.frames(),
                      20, "the 30 book frames of the capture")
    assert [m.payload for m in frames] == recorded  # byte-identical, same order
    assert [m.seq for m in frames] == list(range(1, 31))
    assert {m.conn_id for m in frames} == {live.conn}
    assert {m.pair_index for m in frames} == {0}
    recv = [m.recv_ns for m in frames]
    assert t0 <= recv[0] and recv == sorted(recv) and recv[-1] <= time.time_ns()
    msgs = live.bookd.messages()
    assert msgs[0].control == ConnectionState(live.conn, True, live.replay.url)
    infos = live.bookd.pair_infos()
    assert [(i.pair, i.conn_id, i.depth, i.price_precision, i.qty_precision)
            for i in infos] == [("MINA/GBP", live.conn, 25, 4, 8)]
    check_connection(live.bookd, live.conn)
    assert verify_checksums(live.bookd, live.conn) == 30


def test_synthetic_frames_verify_with_pairinfo_precisions(kf: Harness) -> None:
    live = start(kf)
    wait_for(lambda: flowing(live.bookd, PAIRS, live.conn, 0, 20), 20,
             "20 frames of every pair")
    infos = {i.pair: (i.price_precision, i.qty_precision) for i in live.bookd.pair_infos()}
    assert infos == {"BTC/USD": (1, 8), "ETH/USD": (2, 8), "PEPE/USD": (9, 8)}
    check_connection(live.bookd, live.conn)
    assert verify_checksums(live.bookd, live.conn) >= 60
    assert live.bus.codes()[:2] == ["CONNECTED", "online"]  # engine status on connect


# -------------------------------------------------------------------------------------
# 2-3. connection loss: drop, stall-all

def test_drop_reconnects_with_new_conn_and_fresh_snapshots(kf: Harness) -> None:
    live = start(kf)
    b, bus = live.bookd, live.bus
    n_bus = len(bus.items)
    live.replay.fault("drop")
    wait_for(lambda: any(not c.up and c.conn_id == live.conn for c in b.conn_states()),
             10, "ConnectionState down")
    new = wait_for(lambda: next((c for c in b.up_conn_ids() if c != live.conn), None),
                   10, "a new connection")
    wait_for(lambda: b.snapshots_of_all(new), 15, "fresh snapshots on the new connection")
    assert b.up_conn_ids() == [live.conn, new]
    check_connection(b, live.conn)
    check_connection(b, new)  # PairInfos again, snapshots first, seq from 1
    wait_for(lambda: in_order(bus.codes(n_bus), ["DISCONNECTED", "RECONNECTING", "CONNECTED"]),
             5, "DISCONNECTED, RECONNECTING, CONNECTED on the bus")
    wait_for(lambda: bus.counter("reconnects") == 1, 5, "the reconnect counted")


def test_stall_all_reconnects_after_heartbeat_limit(kf: Harness) -> None:
    live = start(kf)
    b, bus = live.bookd, live.bus
    hb = limits(live.cfg).data_ingestor.max_heartbeat_interval_s
    backoff = limits(live.cfg).data_ingestor.max_reconnect_delay_s
    live.replay.fault("stall-all")
    wait_for(lambda: any(not c.up and c.conn_id == live.conn for c in b.conn_states()),
             hb + SLACK, "ConnectionState down after the heartbeat limit")
    wait_for(lambda: any(c != live.conn for c in b.up_conn_ids()), backoff + SLACK,
             "a reconnect")
    down = bus.system("DISCONNECTED")
    assert down and "no heartbeat" in down[0]["status_message"]
    live.replay.control.clear()
    conn = wait_for(lambda: next((c for c in set(b.up_conn_ids()) - {live.conn}
                                  if b.snapshots_of_all(c)), None),
                    15, "books on a new connection after the stall")
    check_connection(b, conn)
    wait_for(lambda: bus.counter("heartbeat_timeouts") >= 1, 5, "heartbeat_timeouts counted")


# -------------------------------------------------------------------------------------
# 4-5. silent books: no reconnect, only the silent book resubscribed

def acks(replay: ReplayHandle) -> int:
    return replay.status()["counters"]["acks"]


def test_stall_data_reports_stale_and_resubscribes_without_reconnect(kf: Harness) -> None:
    live = start(kf)
    b, bus = live.bookd, live.bus
    silence = limits(live.cfg).ingest.book_silence_s
    n, n_bus, acks0 = len(b.items), len(bus.items), acks(live.replay)
    live.replay.fault("stall")
    wait_for(lambda: {s.pair for s in b.stales(n)} == set(PAIRS), silence + SLACK,
             "a Stale for every book")
    assert {s.conn_id for s in b.stales(n)} == {live.conn}
    wait_for(lambda: {e["pair"] for e in bus.system("STALE", since=n_bus)
                      if "book" in e["status_message"]} >= set(PAIRS), 5,
             "SystemStateEvent STALE for every book")
    # resubscribed while stalled: each book unsubscribed and subscribed again (acks go on)
    wait_for(lambda: acks(live.replay) >= acks0 + 2 * len(PAIRS), 10,
             "unsubscribe and subscribe acks for every book")
    live.replay.control.clear()
    wait_for(lambda: b.snapshots_of_all(live.conn, n), 15, "fresh snapshots, same connection")
    wait_for(lambda: flowing(b, PAIRS, live.conn, n, 10), 10, "books flowing again")
    assert b.up_conn_ids() == [live.conn]
    assert not [c for c in b.conn_states() if not c.up]
    assert "DISCONNECTED" not in bus.codes() and bus.counter("reconnects") == 0
    check_connection(b, live.conn)


def test_silence_one_pair_resubscribes_that_pair_alone(kf: Harness) -> None:
    live = start(kf)
    b, bus = live.bookd, live.bus
    quiet, others = "ETH/USD", ("BTC/USD", "PEPE/USD")
    silence = limits(live.cfg).ingest.book_silence_s
    n, n_bus, acks0 = len(b.items), len(bus.items), acks(live.replay)
    live.replay.fault(f"silence:pair={quiet}")
    stale = wait_for(lambda: b.stales(n), silence + SLACK, f"a Stale for {quiet}")
    assert [(s.pair, s.conn_id) for s in stale] == [(quiet, live.conn)]
    assert isinstance(stale[0], Stale) and stale[0].silent_ns > 0
    n_stale = len(b.items)
    wait_for(lambda: flowing(b, others, live.conn, n_stale, 10), 10, "other books flowing")
    wait_for(lambda: acks(live.replay) >= acks0 + 2, 10, f"{quiet} unsubscribed, subscribed")
    live.replay.control.clear()
    wait_for(lambda: any(m.is_snapshot for m in b.frames(quiet, live.conn, n_stale)), 15,
             f"a fresh snapshot of {quiet}")
    assert {s.pair for s in b.stales(n)} == {quiet}
    assert {e["pair"] for e in bus.system("STALE", since=n_bus)} == {quiet}
    assert not any(m.is_snapshot for p in others for m in b.frames(p, live.conn, n))
    assert b.up_conn_ids() == [live.conn] and bus.counter("reconnects") == 0
    check_connection(b, live.conn)


# -------------------------------------------------------------------------------------
# 6-7. subscription answers: rate limit, refusal

def test_rate_limit_paced_retry_acks_everything(kf: Harness) -> None:
    live = start(kf, wait=False, replay_args=SYNTH + ("--fault", "rate-limit:count=2"))
    b, bus = live.bookd, live.bus
    conn = wait_for(b.current_conn, 20, "a connection")
    wait_for(lambda: b.snapshots_of_all(conn), 20, "books of every pair after the retry")
    wait_for(lambda: flowing(b, PAIRS, conn, 0, 5), 10, "books flowing")
    wanted = 1 + 2 * len(PAIRS)  # instrument, then a trade and a book per pair
    wait_for(lambda: bus.counter("acks") >= wanted and bus.counter("rate_limited") >= 1, 10,
             "every subscription acked, the rate limit counted")
    status = live.replay.status()["counters"]
    # the two injected errors and no more: the retries were paced below the server's
    # own request rate limit
    assert status["fault_rate-limit"] == 2 and status["rate_limited"] == 2
    assert status["refusals"] == 0
    assert b.up_conn_ids() == [conn] and bus.counter("refused") == 0
    check_connection(b, conn)


def test_refused_book_reports_error_for_that_pair_only(kf: Harness) -> None:
    bad = "ETH/USD"
    live = start(kf, wait=False,
                 replay_args=SYNTH + ("--fault", f"refuse:channel=book,pair={bad}"))
    b, bus = live.bookd, live.bus
    err = wait_for(lambda: bus.system("ERROR", pair=bad), 20, f"an ERROR naming {bad}")
    assert bad in err[0]["status_message"] and "refused" in err[0]["status_message"]
    conn = wait_for(b.current_conn, 5, "the connection at FakeBookd")
    good = [p for p in PAIRS if p != bad]
    wait_for(lambda: flowing(b, good, conn, 0, 20), 15, "the other books flowing")
    assert b.frames(bad) == []
    assert [e["pair"] for e in bus.system("ERROR")] == [bad]
    assert b.up_conn_ids() == [conn]
    check_connection(b, conn)


# -------------------------------------------------------------------------------------
# 8-9. bad frames and engine status

def test_garbage_truncated_oversized_counted_connection_kept(kf: Harness) -> None:
    live = start(kf, ingest={"max_frame_bytes": 64 * 1024})
    b, bus = live.bookd, live.bus
    n = len(b.items)
    for spec in ("garbage", "truncated", "oversized:bytes=200000"):
        live.replay.fault(spec)
    wait_for(lambda: bus.counter("decode_errors") >= 1 and bus.counter("oversized") >= 1, 10,
             "decode_errors and oversized in ingest's StatsEvent")

    def truncated() -> list:
        out = []
        for m in b.frames(since=n):
            try:
                msgspec.json.decode(m.payload)
            except msgspec.DecodeError:
                out.append(m)
        return out
    # ingest peeks at book frames, it does not parse them: the cut book frame goes to
    # bookd as it came, in sequence, and bookd's decoder counts it.
    cut = wait_for(truncated, 10, "the truncated book frame at FakeBookd")
    assert len(cut) == 1 and cut[0].is_snapshot and cut[0].conn_id == live.conn
    after = len(b.items)
    wait_for(lambda: flowing(b, PAIRS, live.conn, after, 5), 10, "books still flowing")
    stats = bus.stats()[-1]
    assert stats["decode_errors"] == 1 and stats["oversized"] == 1
    assert stats["reconnects"] == 0 and stats["disconnects"] == 0
    assert b.up_conn_ids() == [live.conn] and not [c for c in b.conn_states() if not c.up]
    check_connection(b, live.conn)


def test_engine_status_maintenance_then_online(kf: Harness) -> None:
    live = start(kf)
    bus = live.bus
    n_bus = len(bus.items)
    live.replay.fault("status:system=maintenance")
    wait_for(lambda: bus.system("maintenance", since=n_bus), 10, "maintenance on the bus")
    live.replay.fault("status:system=online")
    wait_for(lambda: bus.system("online", pair=None, since=n_bus), 10, "online on the bus")
    engine = [e for e in bus.system(since=n_bus) if e["pair"] is None]
    assert [e["status_code"] for e in engine] == ["maintenance", "online"]
    assert all(e["service_name"] == "ingest" for e in engine)
    assert live.bookd.up_conn_ids() == [live.conn]


# -------------------------------------------------------------------------------------
# 10-12. a consumer that stops reading, SIGTERM, resync

def test_slow_bookd_drops_counted_loop_alive_and_gap_visible(kf: Harness) -> None:
    live = start(kf, replay_args=("--synthetic", "--speed", "max"), wait=False,
                 bookd_kw={"rcvhwm": 1, "reading": False}, ingest={"send_hwm": 10})
    b, bus = live.bookd, live.bus
    wait_for(lambda: bus.counter("drops_bookd") > 0, 20, "drops_bookd > 0")
    stats0 = len(bus.stats())
    hb0 = bus.counter("heartbeats")
    wait_for(lambda: len(bus.stats()) >= stats0 + 3 and bus.counter("heartbeats") > hb0, 10,
             "stats and heartbeats going on while bookd does not read")
    acks0 = bus.counter("acks")
    b.resync([PAIRS[0]])  # the event loop still answers control and processes acks
    wait_for(lambda: bus.counter("acks") >= acks0 + 2, 10, "resync acks while dropping")
    b.start_reading()

    def gaps() -> dict[str, tuple[int, int]]:
        found = {}
        for pair in PAIRS:
            last: dict[int, int] = {}
            for m in b.frames(pair):
                prev = last.get(m.conn_id)
                assert prev is None or m.seq > prev  # never back, never twice
                if prev is not None and m.seq > prev + 1:
                    found[pair] = (prev, m.seq)
                last[m.conn_id] = m.seq
        return found

    # What was queued when bookd started reading runs on from seq 1 without a hole (up
    # to ~10 batches of 128 frames): the gap shows with the first frames sent after the
    # drops.
    found = wait_for(gaps, 10, "a sequence gap where ingest dropped frames", interval=0.2)
    print(f"gaps {found} after {len(b.frames())} frames")
    assert live.ingest.poll() is None


def test_sigterm_exits_zero_promptly_and_tells_bookd(kf: Harness) -> None:
    live = start(kf)
    t0 = time.monotonic()
    live.ingest.send_signal(signal.SIGTERM)
    rc = live.ingest.wait(10)
    elapsed = time.monotonic() - t0
    print(f"ingest exited {rc} {elapsed:.2f} s after SIGTERM")
    assert rc == 0 and elapsed < 3.0
    wait_for(lambda: ConnectionState(live.conn, False, "stopping") in live.bookd.conn_states(),
             5, "ConnectionState down at FakeBookd")
    wait_for(lambda: live.bus.system("DISCONNECTED"), 5, "DISCONNECTED on the bus")
    assert "Traceback" not in live.ingest.log(500)


def test_resync_request_resends_pairinfo_then_snapshot_of_that_pair(kf: Harness) -> None:
    live = start(kf)
    b, bus = live.bookd, live.bus
    pair = "ETH/USD"
    wait_for(lambda: flowing(b, PAIRS, live.conn, 0, 5), 10, "books flowing")
    n = len(b.items)
    b.resync([pair], conn_id=live.conn, reason="checksum mismatch")
    info_at = wait_for(lambda: next((k for k, m in enumerate(b.messages()[n:], n)
                                     if isinstance(m.control, PairInfo)), None),
                       10, f"a PairInfo for {pair}")
    info = b.messages()[info_at].control
    assert (info.pair, info.conn_id, info.price_precision) == (pair, live.conn, 2)
    wait_for(lambda: any(m.is_snapshot for m in b.frames(pair, live.conn, info_at)), 10,
             f"a fresh snapshot of {pair} after its PairInfo")
    others = [p for p in PAIRS if p != pair]
    wait_for(lambda: flowing(b, others, live.conn, n, 5), 10, "the other books flowing")
    assert [i.pair for i in b.pair_infos(n)] == [pair]
    assert not any(m.is_snapshot for p in others for m in b.frames(p, since=n))
    assert b.up_conn_ids() == [live.conn]
    check_connection(b, live.conn)
    wait_for(lambda: bus.counter("resync_requests") == 1 and bus.counter("resyncs") == 1, 5,
             "the resync counted")


# -------------------------------------------------------------------------------------
# 13. TLS

def make_certs(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for localhost/127.0.0.1: (ca.pem, cert, key)."""
    try:
        return _certs_cryptography(d)
    except ImportError:
        pass
    if shutil.which("openssl") is None:
        pytest.skip("neither the cryptography package nor the openssl CLI is available "
                    "to make a test certificate")
    return _certs_openssl(d)


def _certs_cryptography(d: Path) -> tuple[Path, Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kf test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "server.pem").write_bytes(cert.public_bytes(pem))
    (d / "server.key").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return d / "ca.pem", d / "server.pem", d / "server.key"


def _certs_openssl(d: Path) -> tuple[Path, Path, Path]:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=kf test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash")
    run("req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost")
    (d / "ext.cnf").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "authorityKeyIdentifier=keyid\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-set_serial", "4242", "-days", "2", "-extfile", "ext.cnf", "-out", "server.pem")
    return d / "ca.pem", d / "server.pem", d / "server.key"


class TlsFeed:
    """A tiny wss:// Kraken stand-in on its own uvloop thread: a status frame on connect,
    an ack for the first subscribe; records SNI names and requests."""

    STATUS = (b'{"channel":"status","type":"update","data":[{"version":"2.0.10",'
              b'"system":"online","api_version":"v2","connection_id":4242}]}')

    def __init__(self, cert: Path, key: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.sni: list[str | None] = []
        self.ctx.sni_callback = lambda sslobj, name, ctx: self.sni.append(name)
        self.requests: list[dict] = []
        self.connections = 0
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="tls-feed")

    def start(self) -> TlsFeed:
        self._thread.start()
        assert self._ready.wait(10), "the TLS server did not start"
        return self

    def _run(self) -> None:
        import uvloop
        uvloop.run(self._main())

    async def _main(self) -> None:
        from picows import WSListener, WSMsgType, ws_create_server
        feed = self

        class Listener(WSListener):
            def on_ws_connected(self, transport: Any) -> None:
                feed.connections += 1
                transport.send(WSMsgType.TEXT, feed.STATUS)

            def on_ws_frame(self, transport: Any, frame: Any) -> None:
                if frame.msg_type != WSMsgType.TEXT:
                    return
                req = msgspec.json.decode(frame.get_payload_as_bytes())
                feed.requests.append(req)
                if req.get("method") == "subscribe" and len(feed.requests) == 1:
                    params = req.get("params", {})
                    ack = {"method": "subscribe", "success": True, "req_id": req.get("req_id"),
                           "result": {"channel": params.get("channel"), "snapshot": True},
                           "time_in": "2026-01-01T00:00:00.000000Z",
                           "time_out": "2026-01-01T00:00:00.000100Z"}
                    transport.send(WSMsgType.TEXT, msgspec.json.encode(ack))

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        # use_aiofastnet=False: aiofastnet 1.2.0 (picows' default transport when it is
        # installed) segfaults in a TLS server whose SSLContext has an sni_callback.
        server = await ws_create_server(lambda request: Listener(), "127.0.0.1", 0,
                                        ssl=self.ctx, websocket_handshake_timeout=5,
                                        use_aiofastnet=False)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        server.close()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)


def test_tls_with_private_ca_and_connect_failure_without_it(kf: Harness,
                                                            tmp_path: Path) -> None:
    ca, cert, key = make_certs(tmp_path)
    feed = TlsFeed(cert, key).start()
    try:
        # max_message_interval_s below the heartbeat limit: this server never sends one
        cfg = kf.config(["BTC/USD"], data_ingestor={"max_heartbeat_interval_s": 30.0,
                                                    "max_message_interval_s": 30.0})
        b, bus = kf.bookd(cfg), kf.bus(cfg)
        url = f"wss://localhost:{feed.port}/v2"
        ingest = kf.ingest(cfg, url, "--ca-file", str(ca))
        conn = wait_for(b.current_conn, 20, "a wss:// connection with the private CA")
        wait_for(lambda: feed.requests, 10, "a subscribe over TLS")
        assert feed.sni and set(feed.sni) == {"localhost"}
        assert feed.requests[0]["method"] == "subscribe"
        wait_for(lambda: bus.system("CONNECTED") and bus.system("online", pair=None), 10,
                 "CONNECTED and the engine status")
        ingest.send_signal(signal.SIGTERM)
        assert ingest.wait(10) == 0
        assert ConnectionState(conn, False, "stopping") in b.conn_states()

        # without --ca-file the system store does not know the CA: a TLS error, counted
        # as a connect failure and retried with backoff, never a crash
        n, n_bus, seen = len(b.items), len(bus.items), feed.connections
        ingest = kf.ingest(cfg, url)
        wait_for(lambda: bus.counter("connect_failures") >= 2, 20, "connect failures counted")
        retries = bus.system("RECONNECTING", since=n_bus)
        assert retries and all("TLS" in e["status_message"] for e in retries)
        assert "CERTIFICATE_VERIFY_FAILED" in retries[0]["status_message"]
        assert ingest.poll() is None and b.conn_states(n) == []
        assert feed.connections == seen  # no WebSocket got past the handshake
        assert bus.counter("connects") >= 2
        assert "Traceback" not in ingest.log(500)
    finally:
        feed.stop()
