"""The ``pinproxy`` command: parses arguments, loads settings, hands over. No logic here."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson

from proxy.config.settings import Settings, load_settings, settings_from_mapping
from proxy.core.errors import ConfigError
from proxy.telemetry.logs import configure_logging
from proxy.upstream.tls import check_tls_files


def _load(path: Path, overrides: dict[str, Any]) -> Settings:
    try:
        settings = load_settings(path)
        if overrides:
            data = settings.model_dump(mode="python")
            for section, fields in overrides.items():
                data[section].update(fields)
            if data["store"].get("password") is not None:
                data["store"]["password"] = data["store"]["password"].get_secret_value()
            settings = settings_from_mapping(data)
        check_tls_files(settings.upstream)  # a bad PEM stops the start, not the first request
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    return settings


F = TypeVar("F", bound=Callable[..., Any])


def _admin_client(command: F) -> F:
    """The options of a command that asks a running proxy's admin API."""
    command = click.option(
        "--token", envvar="PINPROXY_ADMIN_TOKEN",
        help="Admin bearer token (default: $PINPROXY_ADMIN_TOKEN).",
    )(command)
    return click.option(
        "--admin", "admin_url", default="http://127.0.0.1:9901", show_default=True,
        help="Base URL of a pinproxy admin listener.",
    )(command)


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
    settings = _load(config_path, {"listen": listen} if listen else {})
    configure_logging(settings.log)
    try:
        code = run(settings)
    except ConfigError as exc:  # found only once binding: e.g. what admin.host resolved to
        raise click.ClickException(str(exc)) from exc
    sys.exit(code)


@main.command("check-config")
@click.argument("config_path", type=click.Path(path_type=Path))
def check_config(config_path: Path) -> None:
    """Validate a settings file and print the resolved settings (secrets masked)."""
    settings = _load(config_path, {})
    click.echo(orjson.dumps(settings.masked(), option=orjson.OPT_INDENT_2).decode())
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

    sys.exit(run_demo(port=port, check=check))


@main.command()
@click.argument("session_id")
@_admin_client
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
@_admin_client
@click.option(
    "--events", type=click.IntRange(0, 1000), default=10, show_default=True,
    help="Recent rollout decisions to show.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON instead of a table.")
def status(admin_url: str, token: str | None, events: int, as_json: bool) -> None:
    """Print the rollout picture: regions x versions, region states, blocked, events."""
    from proxy.admin.client import AdminRequestError, get_rollout
    from proxy.cli.statusview import render_status

    try:
        document = get_rollout(admin_url, token=token)
    except AdminRequestError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(render_status(document, events=events), nl=False)
