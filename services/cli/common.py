"""What every ``crucible`` command group shares: one-line error messages instead of tracebacks, and reading a
YAML (or JSON) file a command was given."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar, cast

import typer

from services.cli.client import ApiError

F = TypeVar("F", bound=Callable[..., Any])


def friendly(fn: F) -> F:
    """Turn expected failures into a one-line message and exit code 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ApiError, ConnectionError, FileNotFoundError, ValueError, RuntimeError, TimeoutError) as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None

    return cast(F, wrapper)


def load_yaml_mapping(path: Path, *, needs: str) -> dict[str, Any]:
    """The mapping in a YAML/JSON file; ValueError (a one-line CLI message) when it is not valid YAML or not a
    mapping. ``needs`` says what the mapping must hold, for the message."""
    import yaml

    try:
        body = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(body, dict):
        raise ValueError(f"{path} must hold a mapping with {needs}")
    return body
