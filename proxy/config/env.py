"""Environment overrides: every ``PINPROXY_*`` variable must name a real setting.

pydantic-settings reads ``PINPROXY_<SECTION>__<FIELD>`` (nested further with ``__``)
and silently ignores any name that matches no field, so a misspelt override
(``PINPROXY_LISTNE__PORT``) would leave the setting at its file value while the
operator believes it changed. This module refuses such names, naming the variable
and the closest real setting.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Final

from pydantic import BaseModel

from proxy.core.errors import ConfigError

PREFIX: Final = "PINPROXY_"
DELIMITER: Final = "__"
# Read by name, outside the PINPROXY_<SECTION>__<FIELD> scheme.
SHORT_NAMES: Final = frozenset({"PINPROXY_ADMIN_TOKEN"})


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The settings model ``annotation`` holds (``Model`` or ``Model | None``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [m for m in map(_model_of, typing.get_args(annotation)) if m is not None]
        return models[0] if len(models) == 1 else None
    return None


def _is_mapping(annotation: Any) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_mapping(arg) for arg in typing.get_args(annotation))
    return typing.get_origin(annotation) in (dict, Mapping)


def setting_path(model: type[BaseModel], name: str) -> str | None:
    """Why ``name`` (a variable name without the prefix) matches no setting, or None.

    Parts are matched case-insensitively, as pydantic-settings matches them. Parts
    below a mapping-valued field (``sessions.pin_token.keys``) are its keys, not checked.
    """
    annotation: Any = model
    parts = name.split(DELIMITER)
    for depth, part in enumerate(parts):
        current = _model_of(annotation)
        if current is None:
            if _is_mapping(annotation):
                return None
            return f"{'.'.join(p.lower() for p in parts[:depth])} is a value, not a section"
        fields = {f.lower(): info for f, info in current.model_fields.items()}
        info = fields.get(part.lower())
        if info is None:
            close = difflib.get_close_matches(part.lower(), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            if depth == 0:
                return f"there is no section {part.lower()!r}{hint}"
            where = ".".join(p.lower() for p in parts[:depth])
            return f"{where} has no field {part.lower()!r}{hint}"
        annotation = info.annotation
    return None


def check_environment(model: type[BaseModel], environ: Mapping[str, str]) -> None:
    """Raise ``ConfigError`` naming every ``PINPROXY_*`` variable that sets nothing."""
    problems = []
    for variable in sorted(environ):
        if not variable.upper().startswith(PREFIX) or variable.upper() in SHORT_NAMES:
            continue
        why = setting_path(model, variable[len(PREFIX) :])
        if why is not None:
            problems.append(f"  {variable}: unknown setting ({why})")
    if problems:
        raise ConfigError(
            "invalid environment overrides (PINPROXY_<SECTION>__<FIELD>):\n" + "\n".join(problems)
        )
