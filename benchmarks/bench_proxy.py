"""Side-by-side proxy harness: the same upstream, the same wrk, in one run.

    .venv/bin/python benchmarks/bench_proxy.py throughput [-c 64 -t 2 -d 10]
    .venv/bin/python benchmarks/bench_proxy.py stream [--size 1073741824]

`throughput` starts a neutral origin (nginx returning a fixed 200, one worker) and every
target in TARGETS, then runs wrk against each in turn and prints req/s and latency with ratios
against nginx `proxy_pass` and against calling the origin directly. A target is one entry:
its name, port and start command; add the full gateway the same way.

`stream` pushes one large response and one large chunked upload through Tollway's proxy
(origin: benchmarks/upstream.py on granian) and samples the proxy worker's RSS, to show the
bodies are streamed rather than buffered.

nginx and wrk come from Debian; if missing and running as root this installs them with
`apt-get update && apt-get install -y nginx wrk`. Every process started here is stopped in a
finally block.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.forwarding import TrustedProxies, request_headers, response_headers  # noqa: E402
from gateway.proxy import Proxy  # noqa: E402
from tenancy.settings import load_settings  # noqa: E402

GRANIAN = str(Path(sys.executable).parent / "granian")
ORIGIN_PORT = 18091
TEMPLATE = Path(__file__).with_name("nginx.conf.template")
NGINX_ORIGIN = "return 200 '{\"ok\":true,\"service\":\"upstream\"}\\n';"
NGINX_PROXY = 'proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection "";'

Command = Callable[[Path], list[str]]
Starter = Callable[[str, list[str], dict[str, str], Path], "subprocess.Popen[bytes]"]


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    start: Command | None = None  # None: the origin itself, already running
    env: dict[str, str] = field(default_factory=dict)


def granian(app: str, port: int) -> Command:
    return lambda _workdir: [
        GRANIAN, "--interface", "asgi", "--factory", "--no-ws", "--workers", "1",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", app,
    ]


def nginx(role: str, port: int) -> Command:
    def command(workdir: Path) -> list[str]:
        home = workdir / f"nginx-{role}"
        home.mkdir(parents=True, exist_ok=True)
        conf = (
            TEMPLATE.read_text()
            .replace("@DIR@", str(home))
            .replace("@PORT@", str(port))
            .replace("@UPSTREAM_PORT@", str(ORIGIN_PORT))
            .replace("@LOCATION@", NGINX_ORIGIN if role == "origin" else NGINX_PROXY)
        )
        (home / "nginx.conf").write_text(conf)
        return [nginx_binary(), "-p", str(home), "-c", str(home / "nginx.conf")]

    return command


PROXY_ENV = {"TOLLWAY_UPSTREAM": f"http://127.0.0.1:{ORIGIN_PORT}"}
TARGETS = [
    Target("direct", ORIGIN_PORT),
    Target("nginx", 18092, nginx("proxy", 18092)),
    Target("tollway-aiohttp", 18093, granian("benchmarks.bench_proxy:aiohttp_app", 18093),
           PROXY_ENV),
    Target("tollway-httpx", 18094, granian("benchmarks.bench_proxy:httpx_app", 18094), PROXY_ENV),
]


# --- the ASGI apps under test (served by granian --factory) ---

Message = MutableMapping[str, Any]


async def _lifespan(receive: Any, send: Any, on_shutdown: Callable[[], Any]) -> None:
    await receive()
    await send({"type": "lifespan.startup.complete"})
    await receive()
    await on_shutdown()
    await send({"type": "lifespan.shutdown.complete"})


def _upstream() -> str:
    return load_settings().upstream or f"http://127.0.0.1:{ORIGIN_PORT}"


def aiohttp_app() -> Callable[..., Any]:
    """Tollway's proxy alone: no tenant resolution, auth, admission or emission."""
    proxy = Proxy(load_settings())
    upstream = _upstream()

    async def app(scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, proxy.close)
            return
        await proxy.forward(
            scope, receive, send, upstream=upstream,
            path=scope.get("raw_path", scope["path"].encode()).decode("latin-1"),
            query=scope["query_string"], headers=scope["headers"],
        )

    return app


def httpx_app() -> Callable[..., Any]:
    """The same forwarding with httpx as the client, for the client-choice comparison.
    GET-shaped: the request body is the first receive() message."""
    import httpx

    settings = load_settings()
    upstream = _upstream()
    trusted = TrustedProxies(settings.trusted_proxies)
    pool = httpx.Limits(max_connections=settings.upstream_pool_size,
                        max_keepalive_connections=settings.upstream_pool_size)
    client = httpx.AsyncClient(limits=pool, timeout=settings.upstream_read_timeout_s)

    async def app(scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, client.aclose)
            return
        peer = scope.get("client")
        headers = request_headers(scope["headers"], client=peer[0] if peer else None,
                                  scheme=scope["scheme"], trusted=trusted)
        body = (await receive()).get("body") or None
        url = upstream + scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        request = client.build_request(scope["method"], url, headers=headers, content=body)
        response = await client.send(request, stream=True)
        try:
            out, _ = response_headers(response.headers.raw)
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    return app


# --- process handling ---

def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def ensure_tools() -> None:
    if shutil.which("wrk") and Path(nginx_binary()).exists():
        return
    if os.geteuid() != 0:
        sys.exit("nginx and wrk are needed: apt-get update && apt-get install -y nginx wrk")
    subprocess.run(["apt-get", "update"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "nginx", "wrk"], check=True,
                   stdout=subprocess.DEVNULL)


@contextmanager
def processes() -> Iterator[Starter]:
    """Starts processes in their own session and always kills each whole group at exit."""
    started: list[subprocess.Popen[bytes]] = []

    def start(
        name: str, cmd: list[str], env: dict[str, str], workdir: Path
    ) -> subprocess.Popen[bytes]:
        log = (workdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            with_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in started:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with_group(proc, signal.SIGKILL)
                proc.wait()


def with_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def wait_ready(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - loopback
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up")
        time.sleep(0.1)


# --- throughput ---

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def wrk(port: int, connections: int, threads: int, seconds: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
         f"http://127.0.0.1:{port}/"],
        check=True, capture_output=True, text=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    result = {"rps": rps, "errors": 0.0}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        result[f"p{pct}"] = float(m[1]) * _UNITS[m[2]] if m else float("nan")
    for pattern in (r"Non-2xx or 3xx responses: (\d+)", r"Socket errors: connect (\d+)"):
        m = re.search(pattern, out)
        result["errors"] += float(m[1]) if m else 0.0
    return result


def throughput(args: argparse.Namespace) -> None:
    ensure_tools()
    chosen = [t for t in TARGETS if not args.only or t.name in args.only]
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp, processes() as start:
        workdir = Path(tmp)
        start("origin", nginx("origin", ORIGIN_PORT)(workdir), {}, workdir)
        wait_ready(f"http://127.0.0.1:{ORIGIN_PORT}/")
        for target in chosen:
            if target.start is not None:
                start(target.name, target.start(workdir), target.env, workdir)
        results: dict[str, dict[str, float]] = {}
        for target in chosen:
            wait_ready(f"http://127.0.0.1:{target.port}/")
            wrk(target.port, args.connections, args.threads, 2)  # warm-up
            results[target.name] = wrk(target.port, args.connections, args.threads,
                                       args.duration)
            r = results[target.name]
            print(f"  {target.name}: {r['rps']:.0f} req/s, p99 {r['p99']:.2f} ms", flush=True)
    report(results, args)


def report(results: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    nginx_rps = results.get("nginx", {}).get("rps")
    direct_rps = results.get("direct", {}).get("rps")
    print(f"\nwrk -t{args.threads} -c{args.connections} -d{args.duration}s, origin: nginx "
          "fixed 200 (1 worker); proxies: 1 worker each\n")
    print("| target | req/s | p50 ms | p99 ms | vs nginx | vs direct | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        vs_nginx = f"{r['rps'] / nginx_rps:.2f}" if nginx_rps else "-"
        vs_direct = f"{r['rps'] / direct_rps:.2f}" if direct_rps else "-"
        print(f"| {name} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {vs_nginx} "
              f"| {vs_direct} | {r['errors']:.0f} |")


# --- streaming memory ---

def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def worker_pid(main_pid: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{main_pid}/task/{main_pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.1)
    raise RuntimeError("granian worker did not start")


class Sampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            time.sleep(0.05)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def stream(args: argparse.Namespace) -> None:
    size = args.size
    origin_port, proxy_port = 18095, 18096
    env = {"TOLLWAY_UPSTREAM": f"http://127.0.0.1:{origin_port}",
           "TOLLWAY_MAX_BODY_BYTES": str(size * 2)}
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp, processes() as start:
        workdir = Path(tmp)
        start("origin", granian("benchmarks.upstream:app", origin_port)(workdir), {}, workdir)
        proxy = start("proxy", granian("benchmarks.bench_proxy:aiohttp_app", proxy_port)(workdir),
                      env, workdir)
        base = f"http://127.0.0.1:{proxy_port}"
        wait_ready(f"http://127.0.0.1:{origin_port}/")
        wait_ready(base + "/")
        pid = worker_pid(proxy.pid)
        idle = rss_kib(pid)
        print(f"proxy worker {pid}: RSS after warm-up {idle / 1024:.1f} MiB")

        began = time.monotonic()
        with Sampler(pid) as down:
            out = subprocess.run(
                ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                 f"{base}/bytes/{size}"], check=True, capture_output=True, text=True).stdout
        seconds = time.monotonic() - began
        print(f"download {out}: {size / seconds / 2**20:.0f} MiB/s, "
              f"peak RSS {down.peak / 1024:.1f} MiB")

        began = time.monotonic()
        with Sampler(pid) as up:
            source = subprocess.Popen(["head", "-c", str(size), "/dev/zero"],
                                      stdout=subprocess.PIPE)
            out = subprocess.run(
                ["curl", "-sS", "-T", "-", "-X", "POST", f"{base}/upload"],
                stdin=source.stdout, check=True, capture_output=True, text=True).stdout.strip()
            source.wait()
        seconds = time.monotonic() - began
        print(f"chunked upload -> {out}: {size / seconds / 2**20:.0f} MiB/s, "
              f"peak RSS {up.peak / 1024:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    tp = sub.add_parser("throughput")
    tp.add_argument("-c", "--connections", type=int, default=64)
    tp.add_argument("-t", "--threads", type=int, default=2)
    tp.add_argument("-d", "--duration", type=int, default=10)
    tp.add_argument("--only", nargs="*", help="target names to run")
    st = sub.add_parser("stream")
    st.add_argument("--size", type=int, default=2**30)
    args = parser.parse_args()
    if args.mode == "throughput":
        throughput(args)
    else:
        stream(args)


if __name__ == "__main__":
    main()
