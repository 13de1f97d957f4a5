"""The ``pinproxy`` command: parses arguments, loads settings, hands over. No logic here."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import orjson

from proxy.config.reload import ConfigSource
from proxy.core.errors import ConfigError
from proxy.runtime.preflight import require_extras, startup_warnings
from proxy.telemetry.logs import configure_logging
from proxy.upstream.tls import check_tls_files

logger = logging.getLogger("pinproxy")

if TYPE_CHECKING:
    from proxy.config.settings import Settings


class StartupFailed(click.ClickException):
    """``serve`` could not start: one line on stderr, exit code 2 (no traceback)."""

    exit_code = 2


def _load(path: Path, overrides: dict[str, Any]) -> Settings:
    try:
        settings = ConfigSource(path, overrides)()
        check_tls_files(settings.upstream)  # a bad PEM stops the start, not the first request
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    return settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pinproxy")
def main() -> None:
    """pinproxy: keeps every LLM session on the prompt version it started with."""


@main.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path),
    help="TOML settings file (see config/example.toml).",
)
@click.option(
    "--workers", type=click.IntRange(1, 64), help="Worker processes (overrides listen.workers)."
)
@click.option("--host", help="Listen address (overrides listen.host).")
@click.option("--port", type=click.IntRange(0, 65535), help="Listen port (overrides listen.port).")
def serve(config_path: Path, workers: int | None, host: str | None, port: int | None) -> None:
    """Run the proxy."""
    from proxy.runtime.server import run  # deferred: keeps check-config free of server imports

    listen = {
        k: v for k, v in (("workers", workers), ("host", host), ("port", port)) if v is not None
    }
    overrides = {"listen": listen} if listen else {}
    source = ConfigSource(config_path, overrides)
    try:
        settings = _load(config_path, overrides)
    except click.ClickException as exc:
        raise StartupFailed(exc.message) from exc
    configure_logging(settings.log)
    for warning in startup_warnings(settings):
        logger.warning("%s", warning)
    try:
        require_extras(settings)
        code = run(settings, source)
    except ConfigError as exc:  # found only once binding: a busy port, what a host resolved to
        raise StartupFailed(str(exc)) from exc
    sys.exit(code)


@main.command("check-config")
@click.argument("config_path", type=click.Path(path_type=Path))
def check_config(config_path: Path) -> None:
    """Validate a settings file and print the resolved settings (secrets masked)."""
    settings = _load(config_path, {})
    click.echo(orjson.dumps(settings.masked(), option=orjson.OPT_INDENT_2).decode())
    for warning in startup_warnings(settings):
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{config_path}: OK ({len(settings.backends)} backends)", err=True)


@main.command()
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="Port the demo proxy listens on.",
)
@click.option(
    "--check", is_flag=True, help="Send the demo requests itself, print what they show, and exit."
)
def demo(port: int, check: bool) -> None:
    """Four simulated regional POPs mid-rollout behind pinproxy; no external services."""
    from proxy.cli.demo import run_demo

    try:
        code = run_demo(port=port, check=check)
    except ConfigError as exc:
        raise StartupFailed(str(exc)) from exc
    except OSError as exc:  # a simulated POP's fixed port (18101-18104) is taken
        raise StartupFailed(f"demo: cannot listen: {exc.strerror or exc}") from exc
    sys.exit(code)


@main.command()
@click.argument("session_id")
@click.option(
    "--admin",
    "admin_url",
    default="http://127.0.0.1:9901",
    show_default=True,
    help="Base URL of a pinproxy admin listener.",
)
@click.option(
    "--token",
    envvar="PINPROXY_ADMIN_TOKEN",
    help="Admin bearer token (default: $PINPROXY_ADMIN_TOKEN).",
)
@click.option(
    "--limit", type=click.IntRange(0, 10_000), help="Trail records to show (default: all kept)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON instead of a table.")
def session(
    session_id: str, admin_url: str, token: str | None, limit: int | None, as_json: bool
) -> None:
    """Print a session's pin and audit trail."""
    from proxy.admin.client import AdminRequestError, get_session
    from proxy.cli.sessionview import render_session

    try:
        document = get_session(admin_url, session_id, token=token, limit=limit)
    except AdminRequestError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(render_session(document), nl=False)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace files that exist already.")
def init(directory: Path, force: bool) -> None:
    """Write the example config, alert rules and Grafana dashboard into DIRECTORY."""
    from proxy.cli.operator_files import write_operator_files

    try:
        written = write_operator_files(directory, force=force)
    except (FileExistsError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"{directory}: {exc.strerror or exc}") from exc
    for path in written:
        click.echo(str(path))
