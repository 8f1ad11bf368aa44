"""The `tollway` CLI driven in-process (typer's CliRunner); the `cli` fixture in conftest.py
gives each test one on its own stores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from typer.testing import CliRunner, Result

from gateway.cli import app
from tenancy.settings import Settings, load_settings


@dataclass
class Cli:
    tmp: Path
    env: dict[str, str | None]

    def __call__(self, *args: str, code: int = 0) -> Result:
        result = CliRunner().invoke(app, list(args), env=self.env)
        assert result.exit_code == code, (args, result.output, result.exception)
        return result

    def json(self, *args: str, code: int = 0) -> Any:
        return orjson.loads(self(*args, "--json", code=code).stdout)

    def settings(self, **overrides: Any) -> Settings:
        return load_settings(env={k: v for k, v in self.env.items() if v is not None
                                  and k.startswith("TOLLWAY_")}, **overrides)
