"""The ``pinproxy`` command as a user runs it: check-config, serve's refusals, the demo."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import click
import orjson

from proxy.cli.demo import demo_settings
from proxy.config.settings import load_settings
from tests.fixtures.proxy import free_port

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
    assert "alice's audit trail (admin API): 10 requests" in result.stdout


def test_demo_check_prints_its_report_alone() -> None:
    """No interactive banner, no request-log lines between the report's lines."""
    result = _pinproxy("demo", "--check", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "curl" not in result.stdout
    assert "Ctrl-C" not in result.stdout
    assert "request_id=" not in result.stdout + result.stderr
    assert "/v1/chat/completions" not in result.stdout + result.stderr


def test_session_command_works_right_after_starting_the_demo() -> None:
    """`pinproxy demo` serves the admin API on `pinproxy session`'s default address."""
    port = free_port()
    demo = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        _wait_for(lambda: _chat(port, "alice") == 200, demo)
        shown = _pinproxy("session", "alice")
        assert shown.returncode == 0, shown.stderr
        assert "session    alice" in shown.stdout
        assert "pinned to  prompt=" in shown.stdout
    finally:
        demo.send_signal(signal.SIGINT)
        out, _ = demo.communicate(timeout=30)
    assert demo.returncode == 0, out.decode()
    assert "pinproxy session alice --admin http://127.0.0.1:9901" in out.decode()


def _chat(port: int, session: str) -> int:
    body = b'{"model": "sim", "messages": [{"role": "user", "content": "hi"}]}'
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=body,
        headers={"X-Session-ID": session, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except (urllib.error.URLError, OSError):
        return 0


def _wait_for(ready: Callable[[], bool], proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the demo exited with {proc.returncode}"
        if ready():
            return
        time.sleep(0.1)
    raise AssertionError("the demo did not answer within 30 s")


def test_every_command_option_has_help_text() -> None:
    """`pinproxy ... --help` and `python -m proxy.sim --help` explain every option."""
    from proxy.cli.main import main
    from proxy.sim.__main__ import main as sim_main

    commands = [sim_main, *main.commands.values()]
    for command in commands:
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help, f"{command.name} {param.opts[0]} has no help text"
    sim_help = subprocess.run(
        [sys.executable, "-m", "proxy.sim", "--help"],
        capture_output=True, text=True, timeout=60, check=True, cwd=ROOT,
    ).stdout
    for param in sim_main.params:
        assert param.opts[0] in sim_help
