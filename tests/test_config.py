"""Config is validated once: errors name the file, the key and what was expected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.config import ConfigError, load_settings

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_repo_config_is_valid() -> None:
    settings = load_settings(REPO / "config.toml")
    assert settings.web.port == 8080
    # make run serves the shipped models: the tuned generator and the ONNX sentiment model
    assert settings.generator.model == "smollm2-support"
    assert settings.sentiment.model == "core/assets/sentiment-minilm"
    assert (settings.sentiment.runtime, settings.sentiment.quantize) == ("onnx", "int8")


def test_unknown_key_named(tmp_path: Path) -> None:
    path = write(tmp_path, "[generator]\nmax_new_tokenz = 10\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert str(path) in str(err.value)
    assert "unknown key 'generator.max_new_tokenz'" in str(err.value)


def test_wrong_type_named(tmp_path: Path) -> None:
    path = write(tmp_path, '[web]\nport = "eighty"\n[escalation]\nnegative_threshold = 2.0\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    message = str(err.value)
    assert "web.port" in message and "integer" in message
    assert "escalation.negative_threshold" in message and "less than or equal to 1" in message


def test_unknown_section_and_bad_enum(tmp_path: Path) -> None:
    path = write(tmp_path, '[generatr]\nx = 1\n[generator]\nbackend = "gpt"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert "unknown key 'generatr'" in str(err.value)
    assert "generator.backend" in str(err.value) and "'transformers'" in str(err.value)


def test_not_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[web\nport = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "nope.toml")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"[web]\nhost = \"\xff\"\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(path)


def test_enabled_platform_without_token_fails_at_check(tmp_path: Path) -> None:
    path = write(tmp_path, "[telegram]\nenabled = true\ntoken_env = \"NO_SUCH_TOKEN_VAR\"\n")
    result = subprocess.run(
        [sys.executable, "-m", "bots.cli", "check-config", "--config", str(path)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 2
    assert "NO_SUCH_TOKEN_VAR" in result.stderr


def test_check_config_cli_reports_bad_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[store]\npath = 3\n")
    result = subprocess.run(
        [sys.executable, "-m", "bots.cli", "check-config", "--config", str(path)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 2
    assert f"{path}: key 'store.path'" in result.stderr


def test_sentiment_runtime_is_validated(tmp_path: Path) -> None:
    path = write(tmp_path, '[sentiment]\nmodel = "m"\nruntime = "tensorrt"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert str(path) in str(err.value)
    assert "sentiment.runtime" in str(err.value) and "'onnx'" in str(err.value)

    path = write(tmp_path, '[sentiment]\nruntime = "onnx"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert str(path) in str(err.value)
    assert 'runtime = "onnx" needs a fine-tuned folder' in str(err.value)
    assert "'sentiment.model'" in str(err.value)

    path = write(tmp_path, '[sentiment]\nmodel = "m"\nruntime = "onnx"\nquantize = "int8"\n')
    s = load_settings(path).sentiment
    assert (s.runtime, s.quantize) == ("onnx", "int8")
    assert load_settings(write(tmp_path, "")).sentiment.runtime == "torch"


def test_sentiment_threads_must_not_be_negative(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, "[sentiment]\nthreads = -1\n"))
    assert "sentiment.threads" in str(err.value) and "config.toml" in str(err.value)


def test_store_url_is_postgresql_without_a_password(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "")).store.url == ""
    for url in ("postgresql://bot@db:5432/support", "postgres://bot@db/support?sslmode=require"):
        assert load_settings(write(tmp_path, f'[store]\nurl = "{url}"\n')).store.url == url

    path = write(tmp_path, '[store]\nurl = "mysql://bot@db/support"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert f"{path}: key 'store.url'" in str(err.value) and "postgresql://" in str(err.value)

    for url in ("postgresql://bot:hunter2@db/support", "postgresql://bot@db/s?password=hunter2"):
        path = write(tmp_path, f'[store]\nurl = "{url}"\n')
        with pytest.raises(ConfigError) as err:
            load_settings(path)
        message = str(err.value)
        assert f"{path}: key 'store.url'" in message
        assert "store.password_env" in message and "environment variable" in message
        assert "hunter2" not in message, "the error must not repeat the password"


def test_pool_and_replica_settings_are_validated(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, ""))
    assert (s.store.pool_min, s.store.pool_max, s.store.password_env) == (
        1, 4, "SUPPORTBOT_DB_PASSWORD")
    assert (s.service.replica_id, s.service.lease_ttl_s, s.service.sweep_interval_s) == (
        "", 30.0, 1.0)
    for text, key in (
        ("[store]\npool_min = 5\n", "store.pool_min"),
        ("[store]\npool_max = 0\n", "store.pool_max"),
        ("[service]\nlease_ttl_s = 0.0\n", "service.lease_ttl_s"),
        ("[service]\nsweep_interval_s = -1.0\n", "service.sweep_interval_s"),
    ):
        path = write(tmp_path, text)
        with pytest.raises(ConfigError) as err:
            load_settings(path)
        assert str(path) in str(err.value) and key in str(err.value), text


def test_report_on_an_unreachable_postgresql_names_the_database(tmp_path: Path) -> None:
    """``supportbot report`` reads the store the config names, PostgreSQL too; one it
    cannot reach is named in a one-line error, not a traceback."""
    path = write(tmp_path, '[store]\nurl = "postgresql://bot@db.invalid/support"\n')
    result = subprocess.run(
        [sys.executable, "-m", "bots.cli", "report", "--config", str(path),
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error: postgresql://bot@db.invalid/support: " in result.stderr
