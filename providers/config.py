"""Settings sources shared by the core and the providers: the environment, a `.env` file, and
`<NAME>_FILE` variables that point at a file holding the value (Docker/Kubernetes secrets)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource


class SettingsFileError(ValueError):
    """A `*_FILE` variable names a file that cannot be read."""


class FileReferenceSource(PydanticBaseSettingsSource):
    """For each field `x`, read the file named by `<PREFIX>X_FILE` (environment first, then the
    `.env` file). A trailing newline is stripped, because editors add one."""

    def __init__(self, settings_cls: type[BaseSettings], dotenv_values: dict[str, str | None]):
        super().__init__(settings_cls)
        self._dotenv = {k.upper(): v for k, v in dotenv_values.items() if v is not None}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        prefix = str(self.settings_cls.model_config.get("env_prefix", ""))
        name = f"{prefix}{field_name}_FILE".upper()
        path = os.environ.get(name) or self._dotenv.get(name)
        if not path:
            return None, field_name, False
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsFileError(
                f"{name} names {path!r}, which cannot be read: {exc.strerror}"
            ) from exc
        return text.rstrip("\n"), field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for field_name, field in self.settings_cls.model_fields.items():
            value, key, _ = self.get_field_value(field, field_name)
            if value is not None:
                values[key] = value
        return values


def env_with_files_sources(
    settings_cls: type[BaseSettings],
    init_settings: PydanticBaseSettingsSource,
    env_settings: PydanticBaseSettingsSource,
    dotenv_settings: PydanticBaseSettingsSource,
) -> tuple[PydanticBaseSettingsSource, ...]:
    """Precedence: explicit arguments, then the environment, then `*_FILE`, then `.env`."""
    dotenv_values: dict[str, str | None] = {}
    env_file = settings_cls.model_config.get("env_file")
    if env_file and Path(str(env_file)).is_file():
        from dotenv import dotenv_values as read_dotenv

        dotenv_values = dict(read_dotenv(str(env_file)))
    return (
        init_settings,
        env_settings,
        FileReferenceSource(settings_cls, dotenv_values),
        dotenv_settings,
    )


# Field-level hint (`Field(json_schema_extra={FILE_PREFERRED: True})`): the value is a file's
# content (a PEM key), so an operator sets `<NAME>_FILE`, and a missing value is reported that way.
FILE_PREFERRED = "refundq_file_preferred"


def variable_name(settings_cls: type[BaseSettings], field_name: str) -> str:
    """The environment variable an operator sets for `field_name` (its `_FILE` form when the
    field is marked `FILE_PREFERRED`)."""
    prefix = str(settings_cls.model_config.get("env_prefix", ""))
    name = f"{prefix}{field_name}".upper()
    field = settings_cls.model_fields.get(field_name)
    extra = field.json_schema_extra if field is not None else None
    if isinstance(extra, dict) and extra.get(FILE_PREFERRED):
        name += "_FILE"
    return name


def missing_variables(settings_cls: type[BaseSettings], error: Exception) -> list[str]:
    """Environment variable names for the required fields a ValidationError reports missing."""
    from pydantic import ValidationError

    names: list[str] = []
    if isinstance(error, ValidationError):
        for item in error.errors():
            if item.get("type") == "missing" and item.get("loc"):
                names.append(variable_name(settings_cls, str(item["loc"][0])))
    return names
