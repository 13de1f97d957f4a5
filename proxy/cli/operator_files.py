"""The operator files the wheel carries (config/ in the repository), and ``pinproxy init``.

``config/`` is their one source. A wheel carries them as the data-only package
``proxy.assets`` (setup.py maps the folder into it); a source checkout run without
installing (``PYTHONPATH=.``) reads the folder itself.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import proxy
from proxy.core.errors import ConfigError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

# What `pinproxy init` writes, by suffix: settings, alert rules (and their promtool
# tests), dashboards. The wheel's package_data in setup.py uses the same patterns.
_SUFFIXES = (".toml", ".yml", ".json")


def bundled_files() -> dict[str, bytes]:
    """Every operator file by name, read from the installed package or the checkout."""
    root: Traversable
    try:
        root = resources.files("proxy.assets")
    except ModuleNotFoundError:
        # Not installed (tests run with PYTHONPATH): the repository's config/ folder.
        root = Path(proxy.__file__).resolve().parent.parent / "config"
    files = {
        entry.name: entry.read_bytes()
        for entry in root.iterdir()
        if entry.is_file() and entry.name.endswith(_SUFFIXES)
    }
    if not files:
        raise ConfigError(f"no operator files found in {root}: is pinproxy installed whole?")
    return dict(sorted(files.items()))


def write_operator_files(directory: Path, *, force: bool) -> list[Path]:
    """Write every bundled file into ``directory`` (created if missing).

    Nothing is written when any of them exists already, unless ``force``: an operator's
    edited config is never half-overwritten. Returns the paths written.
    """
    files = bundled_files()
    targets = {directory / name: data for name, data in files.items()}
    existing = sorted(str(path) for path in targets if path.exists())
    if existing and not force:
        raise FileExistsError(
            f"not overwriting {', '.join(existing)} (use --force to replace them)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    for path, data in targets.items():
        path.write_bytes(data)
    return list(targets)
