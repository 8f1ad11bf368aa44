"""Process settings: `TOLLWAY_*` environment variables over an optional TOML file.

Every field has a default that works on a laptop with nothing installed, so `tollway serve`
runs on embedded stores. The environment wins over the file so that one image can be
configured per deployment without editing files.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "TOLLWAY_"
DEFAULT_CONFIG_FILE = "tollway.toml"


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path(".tollway")
    database_url: str | None = None
    redis_url: str | None = None
    clickhouse_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    admin_host: str | None = None
    admin_port: int | None = None
    workers: int = 1
    log_level: str = "info"
    regions: tuple[str, ...] = ("us-east-1", "eu-west-1", "ap-southeast-1")
    default_region: str = "us-east-1"
    default_plan: str = "starter"
    grace_days: int = 30
    base_domains: tuple[str, ...] = ("localhost",)
    upstream: str | None = None
    key_environment: str = "live"
    change_channel: str = "tollway:changes"
    plans_file: Path | None = None
    # gateway: tenant resolution and authentication
    tenant_sources: tuple[str, ...] = ("key", "jwt", "subdomain", "domain", "path", "header")
    jwt_algorithms: tuple[str, ...] = ("RS256", "ES256")
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_tenant_claim: str = "tenant_id"
    jwt_leeway_s: int = 30
    jwks_url: str | None = None
    jwks_min_refetch_s: int = 30
    snapshot_check_s: float = 0.5
    # gateway: admission
    redis_timeout_ms: int = 50
    breaker_failures: int = 5
    breaker_reset_s: float = 2.0
    # gateway: proxy
    upstream_connect_timeout_s: float = 2.0
    upstream_read_timeout_s: float = 30.0
    upstream_pool_size: int = 256
    upstream_ca_file: Path | None = None
    max_header_bytes: int = 16384
    max_body_bytes: int = 10 * 1024 * 1024
    trusted_proxies: tuple[str, ...] = ()
    tenant_signing_keys: tuple[str, ...] = ()
    # usage events and metering
    usage_shards: int = 4
    usage_flush_ms: int = 100
    usage_batch: int = 5000
    consumer_batch: int = 50000
    spool_max_bytes: int = 256 * 1024 * 1024
    usage_claim_idle_ms: int = 30000
    raw_ttl_days: int = 400
    meters_file: Path | None = None
    embedded_worker: bool = True

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'tollway.db').resolve()}"

    @property
    def admin_separate(self) -> bool:
        return self.admin_port is not None


def _coerce(value: str, target: Any) -> Any:
    if target is bool:
        return value.strip().lower() in {"1", "true", "yes", "on"}
    if target is int:
        return int(value)
    if target is float:
        return float(value)
    if target is Path:
        return Path(value)
    if isinstance(target, type) and issubclass(target, tuple):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    return value


def _field_types() -> dict[str, Any]:
    hints = {
        "Path": Path, "Path | None": Path, "str": str, "str | None": str, "int": int,
        "int | None": int, "bool": bool, "float": float, "tuple[str, ...]": tuple,
    }
    return {f.name: hints[str(f.type)] for f in dataclasses.fields(Settings)}


def load_settings(
    env: dict[str, str] | None = None, config_file: Path | None = None, **overrides: Any
) -> Settings:
    """Merge defaults, the TOML file, the environment and explicit overrides, in that order."""
    env = dict(os.environ if env is None else env)
    types = _field_types()
    values: dict[str, Any] = {}
    named = env.get(ENV_PREFIX + "CONFIG")
    path = config_file or (Path(named) if named else None)
    if path is None and Path(DEFAULT_CONFIG_FILE).is_file():
        path = Path(DEFAULT_CONFIG_FILE)
    if path is not None:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
        section = raw.get("tollway", raw)
        for key, val in section.items():
            if key not in types:
                raise ValueError(f"{path}: unknown setting {key!r}")
            if types[key] is tuple:
                val = tuple(val) if isinstance(val, list) else _coerce(str(val), tuple)
            elif types[key] is Path:
                val = Path(val)
            values[key] = val
    for name, target in types.items():
        raw_env = env.get(ENV_PREFIX + name.upper())
        if raw_env is not None and raw_env != "":
            try:
                values[name] = _coerce(raw_env, target)
            except ValueError as exc:
                raise ValueError(f"{ENV_PREFIX}{name.upper()}: {exc}") from exc
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)
