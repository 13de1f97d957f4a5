"""The ``pinproxy`` command as a user runs it: check-config, serve's refusals, the demo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from proxy.cli.demo import demo_settings
from proxy.config.settings import load_settings

ROOT = Path(__file__).resolve().parents[3]


def _pinproxy(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


def test_check_config_prints_resolved_settings_with_secrets_masked(tmp_path: Path) -> None:
    config = tmp_path / "p.toml"
    config.write_text(
        '[store]\nkind = "redis"\nurl = "redis://app:hunter2@cache:6379/0"\npassword = "s3cret"\n'
        '[[backends]]\nid = "a"\nregion = "r"\nurl = "http://pop-a:8000"\n'
    )
    result = _pinproxy("check-config", str(config))
    assert result.returncode == 0, result.stderr
    resolved = orjson.loads(result.stdout)
    assert resolved["store"]["url"] == "redis://app:***@cache:6379/0"
    assert resolved["store"]["password"] == "***"
    assert resolved["backends"] == [
        {"id": "a", "region": "r", "url": "http://pop-a:8000", "version_source": "poll"}
    ]
    assert resolved["routing"]["pin_wait_ms"] == 2000
    assert "hunter2" not in result.stdout + result.stderr
    assert "s3cret" not in result.stdout + result.stderr


def test_check_config_names_every_bad_field_and_exits_1(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        "[listen]\nworkres = 2\n[routing]\npin_wait_ms = -1\n"
        '[[backends]]\nid = "a"\nregion = "r"\nurl = "ftp://x"\n'
    )
    result = _pinproxy("check-config", str(config))
    assert result.returncode == 1
    assert "listen.workres" in result.stderr
    assert "routing.pin_wait_ms" in result.stderr
    assert "backends.0.url" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_accepts_the_shipped_examples() -> None:
    for name in ("example.toml", "demo.toml"):
        result = _pinproxy("check-config", str(ROOT / "config" / name))
        assert result.returncode == 0, result.stderr


def test_demo_config_file_matches_what_the_demo_runs() -> None:
    assert load_settings(ROOT / "config" / "demo.toml") == demo_settings()


def test_demo_check_shows_a_session_staying_on_its_version() -> None:
    result = _pinproxy("demo", "--check", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"stayed_on_version":true' in result.stdout
    assert "curl" in result.stdout
