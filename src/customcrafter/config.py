"""Shared pieces of the pydantic configs.

Every stage has its own config model (`training.config.TrainConfig`, `evaluation.config.EvalConfig`, ...).
All of them derive from :class:`StrictModel` (unknown keys are errors) and are read with :func:`load_config`:
defaults, then a YAML file, then ``key.sub=value`` overrides from the command line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["StrictModel", "ConfigError", "load_config", "apply_overrides", "save_config"]


class StrictModel(BaseModel):
    """Base of every config: unknown keys are rejected, values validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and field."""


M = TypeVar("M", bound=BaseModel)


def _parse_value(text: str) -> Any:
    """An override's value as YAML (numbers, lists, null), except where YAML 1.1 would change plain text: ``no``,
    ``off``, ``yes``, ``on`` stay words (``mixed_precision=no``; a bool field still reads them as false/true), a
    ``#`` is not a comment (``a photo #1``), and ``a: b`` is not a mapping unless written ``{a: b}``."""
    flow = text.lstrip().startswith(("[", "{"))
    if "#" in text and not flow:
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        return text.strip()
    if isinstance(value, dict) and not flow:
        return text
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(value)
    return data


def load_config(cls: type[M], path: str | Path | None = None, overrides: list[str] | None = None,
                **fields: Any) -> M:
    """Build ``cls`` from defaults, an optional YAML/JSON file, overrides and keyword fields (in that order)."""
    data: dict[str, Any] = {}
    origins: dict[str, str] = {}  # top-level field -> where its value came from, for error messages
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data.update(loaded)
        origins.update(dict.fromkeys(loaded, source))
    apply_overrides(data, overrides)
    if overrides:
        source = "overrides (--set)" if path is None else f"{source} + overrides (--set)"
        origins.update(dict.fromkeys((item.split("=", 1)[0].strip().split(".")[0] for item in overrides),
                                     "overrides (--set)"))
    given = {k: v for k, v in fields.items() if v is not None}
    data.update(given)
    origins.update(dict.fromkeys(given, "options"))
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in errors)
        # the message names where the bad values came from: the file, --set, an option, or the defaults
        blamed = dict.fromkeys(origins.get(str(err["loc"][0]), "defaults") if err["loc"] else source
                               for err in errors)
        raise ConfigError(f"{' + '.join(blamed)}: invalid {cls.__name__}: {problems}") from None


def save_config(config: BaseModel, path: str | Path) -> None:
    """Write the resolved config as JSON (atomically)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(config.model_dump(mode="json"), indent=2, sort_keys=True))
    tmp.replace(path)
