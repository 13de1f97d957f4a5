"""``pinproxy serve`` that cannot start says why in one line and exits 2, no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.proxy import free_port

ROOT = Path(__file__).resolve().parents[3]
BACKEND = '[[backends]]\nid = "a"\nregion = "r"\nurl = "http://127.0.0.1:1"\n'


def _pinproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def _one_line_exit_2(result: subprocess.CompletedProcess[str], says: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    assert says in errors[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another program listens on (without SO_REUSEPORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "p.toml"
    path.write_text(text)
    return str(path)


def test_a_busy_listen_port_is_one_line_and_exit_2(tmp_path: Path, taken_port: int) -> None:
    config = _config(
        tmp_path, f'[listen]\nhost = "127.0.0.1"\nport = {taken_port}\n[admin]\nport = 0\n{BACKEND}'
    )
    _one_line_exit_2(
        _pinproxy("serve", "--config", config),
        f"listen.port: cannot listen on 127.0.0.1:{taken_port}: the address is already in use",
    )


def test_a_busy_admin_port_is_one_line_and_exit_2(tmp_path: Path, taken_port: int) -> None:
    config = _config(
        tmp_path,
        f'[listen]\nhost = "127.0.0.1"\nport = {free_port()}\n[admin]\nport = {taken_port}\n'
        + BACKEND,
    )
    _one_line_exit_2(
        _pinproxy("serve", "--config", config),
        f"admin.port: cannot listen on 127.0.0.1:{taken_port}: the address is already in use",
    )


def test_a_busy_port_with_workers_is_found_before_any_worker_starts(
    tmp_path: Path, taken_port: int, redis_url: str
) -> None:
    config = _config(
        tmp_path,
        f'[listen]\nhost = "127.0.0.1"\nport = {taken_port}\nworkers = 2\n'
        f'[store]\nkind = "redis"\nurl = "{redis_url}"\n[admin]\nport = {free_port()}\n{BACKEND}',
    )
    result = _pinproxy("serve", "--config", config)
    _one_line_exit_2(result, f"listen.port: cannot listen on 127.0.0.1:{taken_port}")
    assert "restarting" not in result.stderr


def test_admin_port_equal_to_listen_port_is_refused_by_check_config_and_serve(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = _config(tmp_path, f"[listen]\nport = {port}\n[admin]\nport = {port}\n{BACKEND}")
    checked = _pinproxy("check-config", config)
    assert checked.returncode == 1
    assert f"admin.port {port} is also listen.port" in checked.stderr
    served = _pinproxy("serve", "--config", config)
    assert served.returncode == 2
    assert served.stderr.splitlines() == [
        "Error: invalid configuration:",
        f"  admin.port {port} is also listen.port: the admin API and the data plane need "
        "ports of their own",
    ]


def test_a_misspelt_environment_override_is_refused_naming_it(tmp_path: Path) -> None:
    config = _config(tmp_path, BACKEND)
    env = {"PINPROXY_LISTNE__PORT": "9999"}
    checked = _pinproxy("check-config", config, env=env)
    assert checked.returncode == 1
    assert "PINPROXY_LISTNE__PORT: unknown setting" in checked.stderr
    assert "did you mean 'listen'?" in checked.stderr
    result = _pinproxy("serve", "--config", config, env=env)
    assert result.returncode == 2
    assert "PINPROXY_LISTNE__PORT: unknown setting" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_warns_about_zero_backends_and_a_shadowing_health_path(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, '[listen]\nhealth_path = "/v1/models"\n')
    checked = _pinproxy("check-config", config)
    assert checked.returncode == 0, checked.stderr
    assert "warning: no backends are configured" in checked.stderr
    assert "warning: listen.health_path '/v1/models' is outside /_pinproxy/" in checked.stderr


def test_serve_logs_the_start_up_warnings(tmp_path: Path, taken_port: int) -> None:
    """The check-config warnings are WARNING lines of serve too (here before it fails)."""
    config = _config(tmp_path, f'[listen]\nhost = "127.0.0.1"\nport = {taken_port}\n')
    result = _pinproxy("serve", "--config", config)
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if "no backends are configured" in line]
    assert "WARNING" in line
