"""The one configuration loader every krakenfeed process uses.

`etc/krakenfeed.toml` has one section per process plus the seed's `[data_ingestor]` and
`[trading]` keys (DESIGN.md section 4). It is decoded into frozen msgspec Structs:

* an absent key takes its documented default (the shipped file lists every one);
* `trading.pairs` has no default and must be a non-empty list of `BASE/QUOTE`;
* an unknown key, a wrong type or a value out of range raises `ConfigError` (a
  `ValueError`) whose message names the key and the allowed values.

Processes call `load_config(path)` and, on `ConfigError`, print the message and exit
with `EX_CONFIG` (78) before any connection is made (`exit_on_config_error`).

Paths: relative paths in the file (`[system] run_dir`) are resolved against the
directory that holds the config file, so `etc/krakenfeed.toml` with `run_dir = "../run"`
puts the run directory at the repository root whatever the working directory is.

Ports: 0 means "derived from the namespace" (`derived_port`), so two namespaces (a
running `make run` and the test suite) never collide on defaults.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
import zlib
from pathlib import Path
from typing import Any

import msgspec

EX_CONFIG = 78
DEFAULT_CONFIG = "etc/krakenfeed.toml"

# Kraken's OHLC intervals: our names -> Kraken minutes (the seed's INTERVAL_MAP).
INTERVAL_MINUTES: dict[str, int] = {
    "1m": 1, "5m": 5, "15m": 15, "30m": 30, "1h": 60,
    "4h": 240, "1d": 1440, "1w": 10080, "15d": 21600,
}
MINUTES_INTERVAL: dict[int, str] = {v: k for k, v in INTERVAL_MINUTES.items()}
BOOK_DEPTHS = (10, 25, 100, 500, 1000)
_PAIR_RE = re.compile(r"^[A-Z0-9.]{1,16}/[A-Z0-9.]{1,16}$")
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


class ConfigError(ValueError):
    """An invalid configuration: the message names the key and what is allowed."""


class SystemConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    namespace: str = "krakenfeed"
    run_dir: str = "../run"
    log_level: str = "INFO"


class DataIngestorConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kraken_ws_url: str = "wss://ws.kraken.com/v2"
    connection_timeout_s: float = 10.0
    max_message_interval_s: float = 15.0
    max_heartbeat_interval_s: float = 10.0
    reconnect_delay_s: float = 1.0
    max_reconnect_delay_s: float = 60.0
    max_reconnect_attempts: int = 10
    book_depth: int = 10
    ohlc_intervals: tuple[str, ...] = ("1m",)
    max_checksum_mismatches_before_resub: int = 1
    critical_error_threshold_before_halt: int = 5


class TradingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pairs: tuple[str, ...] = ()


class IngestConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    snapshot_timeout_s: float = 10.0
    book_silence_s: float = 60.0
    max_frame_bytes: int = 4 * 1024 * 1024
    requests_per_s: float = 10.0
    symbols_per_request: int = 25
    ping_interval_s: float = 30.0
    healthy_after_s: float = 30.0
    halt_cooldown_s: float = 300.0
    send_hwm: int = 100_000


class BookdConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    heartbeat_ms: int = 100
    stale_after_s: float = 60.0
    max_resyncs_before_halt: int = 5
    resync_window_s: float = 300.0
    stats_interval_s: float = 5.0


class BusConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    bind_host: str = "127.0.0.1"
    json_port: int = 0
    msgpack_port: int = 0
    cache_port: int = 0
    sndhwm: int = 100_000
    stats_interval_s: float = 5.0


class HaltdConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    exit_on_halt: bool = False
    crash_loop_count: int = 3
    crash_loop_window_s: float = 60.0


class ReplayConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 0
    control_port: int = 0
    rate_burst: int = 10
    rate_per_s: float = 20.0
    heartbeat_s: float = 1.0


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    trading: TradingConfig
    system: SystemConfig = SystemConfig()
    data_ingestor: DataIngestorConfig = DataIngestorConfig()
    ingest: IngestConfig = IngestConfig()
    bookd: BookdConfig = BookdConfig()
    bus: BusConfig = BusConfig()
    haltd: HaltdConfig = HaltdConfig()
    replay: ReplayConfig = ReplayConfig()
    # Directory of the config file, set by the loader; relative paths resolve against it.
    base_dir: str = "."

    # -- derived values -------------------------------------------------------------
    @property
    def run_path(self) -> Path:
        p = Path(self.system.run_dir)
        return p if p.is_absolute() else (Path(self.base_dir) / p).resolve()

    @property
    def namespace(self) -> str:
        return self.system.namespace

    def ipc(self, name: str) -> str:
        """`ipc://<run dir>/<namespace>.<name>`: every internal socket lives here."""
        return f"ipc://{self.run_path}/{self.namespace}.{name}"

    def port(self, section: str, key: str) -> int:
        value = getattr(getattr(self, section), key)
        return value if value else derived_port(self.namespace, f"{section}.{key}")

    @property
    def ohlc_minutes(self) -> tuple[int, ...]:
        return tuple(INTERVAL_MINUTES[i] for i in self.data_ingestor.ohlc_intervals)


_PORT_KEYS = (
    ("bus", "json_port"), ("bus", "msgpack_port"), ("bus", "cache_port"),
    ("replay", "port"), ("replay", "control_port"),
)


def derived_port(namespace: str, key: str) -> int:
    """A stable default port in 20000-39999 derived from the namespace.

    Each namespace gets a block of 8 consecutive ports; the key picks one in it.
    """
    slot = [f"{s}.{k}" for s, k in _PORT_KEYS].index(key)
    block = zlib.crc32(namespace.encode()) % 2500
    return 20000 + block * 8 + slot


def _fail(key: str, msg: str) -> ConfigError:
    return ConfigError(f"config key {key}: {msg}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise _fail(key, f"must be > 0, got {value!r}")


def validate(cfg: Config) -> Config:
    """Range checks msgspec's type checks cannot express. Returns cfg unchanged."""
    if not cfg.trading.pairs:
        raise _fail("trading.pairs", "is required: a non-empty list like [\"BTC/USD\", \"ETH/USD\"]")
    for pair in cfg.trading.pairs:
        if not _PAIR_RE.match(pair):
            raise _fail("trading.pairs", f"{pair!r} is not BASE/QUOTE in upper case (e.g. \"BTC/USD\")")
    if len(set(cfg.trading.pairs)) != len(cfg.trading.pairs):
        raise _fail("trading.pairs", "lists a pair twice")
    if not _NAMESPACE_RE.match(cfg.system.namespace):
        raise _fail("system.namespace", "must be 1-32 characters of A-Z a-z 0-9 _ -")
    if cfg.system.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise _fail("system.log_level", "must be one of DEBUG, INFO, WARNING, ERROR")
    di = cfg.data_ingestor
    if not di.kraken_ws_url.startswith(("ws://", "wss://")):
        raise _fail("data_ingestor.kraken_ws_url", "must start with ws:// or wss://")
    if di.book_depth not in BOOK_DEPTHS:
        raise _fail("data_ingestor.book_depth",
                    f"must be one of {', '.join(map(str, BOOK_DEPTHS))}, got {di.book_depth}")
    for key in ("connection_timeout_s", "max_message_interval_s", "max_heartbeat_interval_s",
                "reconnect_delay_s", "max_reconnect_delay_s"):
        _positive(f"data_ingestor.{key}", getattr(di, key))
    if di.reconnect_delay_s > di.max_reconnect_delay_s:
        raise _fail("data_ingestor.reconnect_delay_s",
                    f"must not exceed max_reconnect_delay_s ({di.max_reconnect_delay_s})")
    for key in ("max_reconnect_attempts", "max_checksum_mismatches_before_resub",
                "critical_error_threshold_before_halt"):
        if getattr(di, key) < 1:
            raise _fail(f"data_ingestor.{key}", "must be an integer >= 1")
    for iv in di.ohlc_intervals:
        if iv not in INTERVAL_MINUTES:
            raise _fail("data_ingestor.ohlc_intervals",
                        f"unknown interval {iv!r}; allowed: {', '.join(INTERVAL_MINUTES)}")
    ing = cfg.ingest
    for key in ("snapshot_timeout_s", "book_silence_s", "requests_per_s", "ping_interval_s",
                "healthy_after_s", "halt_cooldown_s"):
        _positive(f"ingest.{key}", getattr(ing, key))
    if ing.max_frame_bytes < 1024:
        raise _fail("ingest.max_frame_bytes", "must be >= 1024")
    if not 1 <= ing.symbols_per_request <= 250:
        raise _fail("ingest.symbols_per_request", "must be between 1 and 250")
    if ing.send_hwm < 1:
        raise _fail("ingest.send_hwm", "must be >= 1")
    bk = cfg.bookd
    if not 10 <= bk.heartbeat_ms <= 250:
        raise _fail("bookd.heartbeat_ms", "must be between 10 and 250 (readers call a writer stale after 1 s)")
    for key in ("stale_after_s", "resync_window_s", "stats_interval_s"):
        _positive(f"bookd.{key}", getattr(bk, key))
    if bk.max_resyncs_before_halt < 1:
        raise _fail("bookd.max_resyncs_before_halt", "must be >= 1")
    _positive("bus.stats_interval_s", cfg.bus.stats_interval_s)
    if cfg.bus.sndhwm < 1:
        raise _fail("bus.sndhwm", "must be >= 1")
    for section, key in _PORT_KEYS:
        value = getattr(getattr(cfg, section), key)
        if not 0 <= value <= 65535:
            raise _fail(f"{section}.{key}", "must be 0 (derived from the namespace) or 1-65535")
    if cfg.haltd.crash_loop_count < 2:
        raise _fail("haltd.crash_loop_count", "must be >= 2 (one kill of a program must not halt)")
    _positive("haltd.crash_loop_window_s", cfg.haltd.crash_loop_window_s)
    rp = cfg.replay
    if rp.rate_burst < 1:
        raise _fail("replay.rate_burst", "must be >= 1")
    _positive("replay.rate_per_s", rp.rate_per_s)
    _positive("replay.heartbeat_s", rp.heartbeat_s)
    return cfg


def _translate(exc: msgspec.ValidationError) -> ConfigError:
    # msgspec says e.g. "Expected `int`, got `str` - at `$.data_ingestor.book_depth`"
    # or "Object contains unknown field `boook_depth` - at `$.data_ingestor`".
    text = str(exc)
    m = re.match(r"(.*?) - at `\$\.?(.*)`$", text)
    where = m.group(2) if m else ""
    what = m.group(1) if m else text
    unknown = re.match(r"Object contains unknown field `(.+)`", what)
    if unknown:
        key = f"{where}.{unknown.group(1)}" if where else unknown.group(1)
        section = where or "top level"
        allowed = _allowed_keys(where)
        return ConfigError(f"config key {key}: unknown key in [{section}]; allowed: {allowed}")
    if what.startswith("Object missing required field `pairs`"):
        return _fail("trading.pairs", "is required: a non-empty list like [\"BTC/USD\"]")
    if what.startswith("Object missing required field `trading`"):
        return _fail("trading.pairs", "is required: add a [trading] section with pairs = [...]")
    return ConfigError(f"config key {where or '(top level)'}: {what}")


def _allowed_keys(section: str) -> str:
    types = {f: t for f, t in zip(Config.__struct_fields__, _field_types(Config), strict=True)}
    t = types.get(section, Config)
    names = [f for f in t.__struct_fields__ if f != "base_dir"]
    return ", ".join(names)


def _field_types(struct: type) -> list[type]:
    hints = msgspec.inspect.type_info(struct)
    return [getattr(f.type, "cls", None) for f in hints.fields]


def load_config_text(text: str, base_dir: str | os.PathLike = ".") -> Config:
    """Parse and validate TOML text. Raises ConfigError."""
    try:
        raw: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config is not valid TOML: {e}") from None
    if "base_dir" in raw:
        raise ConfigError("config key base_dir: unknown key at the top level")
    raw["base_dir"] = str(base_dir)
    try:
        cfg = msgspec.convert(raw, Config, strict=True)
    except msgspec.ValidationError as e:
        raise _translate(e) from None
    return validate(cfg)


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Load the config file (default: $KRAKENFEED_CONFIG or etc/krakenfeed.toml)."""
    p = Path(path or os.environ.get("KRAKENFEED_CONFIG") or DEFAULT_CONFIG)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
    return load_config_text(text, base_dir=p.resolve().parent)


def exit_on_config_error(path: str | os.PathLike | None, prog: str) -> Config:
    """Load the config or print one clear line and exit 78 (EX_CONFIG), no traceback."""
    try:
        return load_config(path)
    except ConfigError as e:
        print(f"{prog}: invalid configuration: {e}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None


def dump_config(cfg: Config) -> str:
    """The resolved config as TOML-like text for --check-config."""
    lines: list[str] = []
    for section in Config.__struct_fields__:
        if section == "base_dir":
            continue
        lines.append(f"[{section}]")
        sub = getattr(cfg, section)
        for key in sub.__struct_fields__:
            value = getattr(sub, key)
            if isinstance(value, tuple):
                value = list(value)
            lines.append(f"{key} = {msgspec.json.encode(value).decode()}")
        lines.append("")
    lines.append(f"# run directory: {cfg.run_path}")
    for section, key in _PORT_KEYS:
        lines.append(f"# {section}.{key} in effect: {cfg.port(section, key)}")
    return "\n".join(lines)
