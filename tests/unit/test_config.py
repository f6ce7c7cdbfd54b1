"""ingest/config.py and `python -m ingest --check-config` (DESIGN.md section 4)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import msgspec
import pytest

from ingest.config import (
    EX_CONFIG,
    Config,
    ConfigError,
    TradingConfig,
    derived_port,
    dump_config,
    exit_on_config_error,
    load_config,
    load_config_text,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "etc" / "krakenfeed.toml"
MINIMAL = '[trading]\npairs = ["BTC/USD"]\n'
SECTIONS = [f for f in Config.__struct_fields__ if f != "base_dir"]


def section_type(name: str) -> type:
    return type(getattr(Config(trading=TradingConfig(("BTC/USD",))), name))


def test_shipped_file_loads():
    cfg = load_config(SHIPPED)
    assert cfg.trading.pairs and all("/" in p for p in cfg.trading.pairs)
    assert cfg.run_path == (SHIPPED.parent / cfg.system.run_dir).resolve()
    assert cfg.ipc("frames") == f"ipc://{cfg.run_path}/{cfg.namespace}.frames"


def test_shipped_file_documents_every_key_with_its_default():
    doc = tomllib.loads(SHIPPED.read_text())
    assert sorted(doc) == sorted(SECTIONS)
    for section in SECTIONS:
        cls = section_type(section)
        assert sorted(doc[section]) == sorted(cls.__struct_fields__), section
        if section == "trading":
            continue  # pairs has no default: the file lists the shipped choice
        defaults = msgspec.json.decode(msgspec.json.encode(cls()))  # tuples -> lists
        for key in cls.__struct_fields__:
            assert doc[section][key] == defaults[key], f"{section}.{key}"


def test_absent_keys_take_defaults():
    cfg = load_config_text(MINIMAL)
    assert cfg.trading.pairs == ("BTC/USD",)
    for section in SECTIONS:
        if section != "trading":
            assert getattr(cfg, section) == section_type(section)(), section
    assert cfg.data_ingestor.book_depth == 10 and cfg.ohlc_minutes == (1,)
    partial = load_config_text(MINIMAL + "[data_ingestor]\nbook_depth = 25\n"
                               "connection_timeout_s = 5\n")
    assert partial.data_ingestor.book_depth == 25
    assert partial.data_ingestor.connection_timeout_s == 5.0  # an int is fine for a float
    assert partial.data_ingestor.reconnect_delay_s == 1.0


def test_ports_and_paths():
    cfg = load_config_text(MINIMAL + '[system]\nnamespace = "kftest"\n[bus]\njson_port = 5555\n',
                           base_dir="/tmp/x")
    assert cfg.port("bus", "json_port") == 5555
    assert cfg.port("bus", "msgpack_port") == derived_port("kftest", "bus.msgpack_port")
    assert 20000 <= cfg.port("replay", "port") < 40000
    assert cfg.run_path == Path("/tmp/run")
    other = load_config_text(MINIMAL + '[system]\nnamespace = "kfother"\n')
    ports = {cfg.port(s, k) for s, k in (("bus", "cache_port"), ("replay", "port"))}
    assert ports.isdisjoint({other.port(s, k) for s, k in (("bus", "cache_port"),
                                                          ("replay", "port"))})


@pytest.mark.parametrize("text,key", [
    (MINIMAL + "[data_ingestor]\nbook_depth = 7\n", "data_ingestor.book_depth"),
    (MINIMAL + "[data_ingestor]\nboook_depth = 10\n", "data_ingestor.boook_depth"),
    (MINIMAL + "[data_ingestor]\nbook_depth = \"10\"\n", "data_ingestor.book_depth"),
    (MINIMAL + "[data_ingestor]\nconnection_timeout_s = true\n",
     "data_ingestor.connection_timeout_s"),
    (MINIMAL + "[tradng]\npairs = []\n", "tradng"),
    ('[trading]\npairs = []\n', "trading.pairs"),
    ('[system]\nlog_level = "INFO"\n', "trading.pairs"),
    ('[trading]\n', "trading.pairs"),
    ('[trading]\npairs = ["BTCUSD"]\n', "trading.pairs"),
    ('[trading]\npairs = ["btc/usd"]\n', "trading.pairs"),
    ('[trading]\npairs = ["BTC/USD", "BTC/USD"]\n', "trading.pairs"),
    ('[trading]\npairs = "BTC/USD"\n', "trading.pairs"),
    (MINIMAL + '[data_ingestor]\nohlc_intervals = ["2m"]\n', "data_ingestor.ohlc_intervals"),
    (MINIMAL + "[data_ingestor]\nconnection_timeout_s = 0\n",
     "data_ingestor.connection_timeout_s"),
    (MINIMAL + "[ingest]\nsnapshot_timeout_s = -1.0\n", "ingest.snapshot_timeout_s"),
    (MINIMAL + "[data_ingestor]\nreconnect_delay_s = 90.0\n", "data_ingestor.reconnect_delay_s"),
    (MINIMAL + "[bus]\njson_port = 70000\n", "bus.json_port"),
    (MINIMAL + "[replay]\nport = -1\n", "replay.port"),
    (MINIMAL + '[data_ingestor]\nkraken_ws_url = "https://ws.kraken.com/v2"\n',
     "data_ingestor.kraken_ws_url"),
    (MINIMAL + '[system]\nnamespace = "a b"\n', "system.namespace"),
    (MINIMAL + "[haltd]\ncrash_loop_count = 1\n", "haltd.crash_loop_count"),
    (MINIMAL + "[bookd]\nheartbeat_ms = 1000\n", "bookd.heartbeat_ms"),
    ('base_dir = "/"\n' + MINIMAL, "base_dir"),
])
def test_bad_configs_name_the_key(text, key):
    with pytest.raises(ConfigError) as ei:
        load_config_text(text)
    msg = str(ei.value)
    assert f"config key {key}" in msg
    assert "\n" not in msg


def test_not_toml_and_missing_files():
    with pytest.raises(ConfigError, match="TOML"):
        load_config_text("[trading\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config("/nonexistent/krakenfeed.toml")


def test_environment_variable_names_the_default_file(tmp_path, monkeypatch):
    f = tmp_path / "kf.toml"
    f.write_text('[trading]\npairs = ["ETH/USD"]\n')
    monkeypatch.setenv("KRAKENFEED_CONFIG", str(f))
    assert load_config().trading.pairs == ("ETH/USD",)
    assert load_config().base_dir == str(tmp_path.resolve())


def test_exit_on_config_error(tmp_path, capsys):
    f = tmp_path / "bad.toml"
    f.write_text(MINIMAL + "[data_ingestor]\nbook_depth = 7\n")
    with pytest.raises(SystemExit) as ei:
        exit_on_config_error(f, "prog")
    assert ei.value.code == EX_CONFIG == 78
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data_ingestor.book_depth" in err and err.startswith("prog:")


def test_dump_config_shows_every_key():
    cfg = load_config(SHIPPED)
    text = dump_config(cfg)
    for section in SECTIONS:
        assert f"[{section}]" in text
        for key in section_type(section).__struct_fields__:
            assert f"\n{key} = " in text, f"{section}.{key}"
    assert f"# run directory: {cfg.run_path}" in text


def _run_ingest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ingest", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_check_config_cli_prints_the_resolved_config(tmp_path):
    f = tmp_path / "kf.toml"
    f.write_text(MINIMAL + "[data_ingestor]\nbook_depth = 25\n")
    r = _run_ingest("--config", str(f), "--check-config")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == dump_config(load_config(f)).strip()
    assert "book_depth = 25" in r.stdout and 'pairs = ["BTC/USD"]' in r.stdout


def test_check_config_cli_refuses_a_bad_depth(tmp_path):
    f = tmp_path / "kf.toml"
    f.write_text(MINIMAL + "[data_ingestor]\nbook_depth = 7\n")
    r = _run_ingest("--config", str(f), "--check-config")
    assert r.returncode == 78
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1
    assert "book_depth" in r.stderr and "Traceback" not in r.stderr
