"""Side-by-side proxy harness: the same upstream, the same load generator, in one run.

    .venv/bin/python benchmarks/bench_proxy.py throughput [-c 64 -t 2 -d 10 --workers 1]
        [--granian "--loop uvloop --runtime-mode st"] [--only direct nginx ...]
        [--profile tollway-gateway]
    .venv/bin/python benchmarks/bench_proxy.py latency [--rate 1000 -d 10]
    .venv/bin/python benchmarks/bench_proxy.py stream [--size 1073741824]

`throughput` starts a neutral origin (nginx returning a fixed 200, one worker) and every
target in TARGETS, then runs wrk against each in turn and prints req/s and latency with ratios
against nginx `proxy_pass` and against calling the origin directly. nginx gets `--workers`
worker processes, the same number as every granian target, so the ratio compares like with
like. `--granian` adds options to every granian command line (loop, runtime mode...). When a
target needs API keys (the full gateway), every target is driven by the same wrk Lua script
rotating `X-API-Key`, so the load generator costs the same everywhere. `--profile NAME`
samples that target's worker with py-spy while wrk runs and prints where the time goes.

`latency` offers a fixed request rate (open loop: requests leave on a schedule, whatever the
previous ones are doing, and latency counts from the scheduled moment, so a stall is not
hidden) to each target in turn, and prints the added p99 over calling the origin directly.

`stream` pushes one large response and one large chunked upload through Tollway's proxy
(origin: benchmarks/upstream.py on granian) and samples the proxy worker's RSS, to show the
bodies are streamed rather than buffered.

nginx and wrk come from Debian; if missing and running as root this installs them with
`apt-get update && apt-get install -y nginx wrk`. Every process started here is stopped in a
finally block.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import gateway_target  # noqa: E402
from gateway.forwarding import TrustedProxies, request_headers, response_headers  # noqa: E402
from gateway.proxy import Proxy  # noqa: E402
from tenancy.settings import load_settings  # noqa: E402

GRANIAN = str(Path(sys.executable).parent / "granian")
ORIGIN_PORT = 18091
REDIS_PORT = 18379
TEMPLATE = Path(__file__).with_name("nginx.conf.template")
NGINX_ORIGIN = "return 200 '{\"ok\":true,\"service\":\"upstream\"}\\n';"
NGINX_PROXY = 'proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection "";'


@dataclass(frozen=True)
class Run:
    """What every command line of one run shares."""

    workdir: Path
    workers: int = 1
    granian_args: tuple[str, ...] = ()
    gateway_env: dict[str, str] = field(default_factory=dict)  # TOLLWAY_* overrides
    redis_url: str | None = None  # None: a private redis-server for the run


Command = Callable[[Run], list[str]]
Starter = Callable[[str, list[str], dict[str, str], Path], "subprocess.Popen[bytes]"]


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    start: Command | None = None  # None: the origin itself, already running
    env: dict[str, str] = field(default_factory=dict)
    # Needs gateway_target.prepare (stores, tenants, keys) before it starts; one preparation
    # is shared by every such target of a run.
    setup: bool = False


def granian(app: str, port: int) -> Command:
    return lambda run: [
        GRANIAN, "--interface", "asgi", "--factory", "--no-ws", "--workers", str(run.workers),
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
        "--no-access-log", *run.granian_args, app,
    ]


def nginx(role: str, port: int) -> Command:
    def command(run: Run) -> list[str]:
        home = run.workdir / f"nginx-{role}"
        home.mkdir(parents=True, exist_ok=True)
        conf = (
            TEMPLATE.read_text()
            .replace("@DIR@", str(home))
            .replace("@PORT@", str(port))
            .replace("@WORKERS@", "1" if role == "origin" else str(run.workers))
            .replace("@UPSTREAM_PORT@", str(ORIGIN_PORT))
            .replace("@LOCATION@", NGINX_ORIGIN if role == "origin" else NGINX_PROXY)
        )
        (home / "nginx.conf").write_text(conf)
        return [nginx_binary(), "-p", str(home), "-c", str(home / "nginx.conf")]

    return command


UPSTREAM = f"http://127.0.0.1:{ORIGIN_PORT}"
PROXY_ENV = {"TOLLWAY_UPSTREAM": UPSTREAM}
TARGETS = [
    Target("direct", ORIGIN_PORT),
    Target("nginx", 18092, nginx("proxy", 18092)),
    Target("tollway-proxy", 18093, granian("benchmarks.bench_proxy:proxy_app", 18093),
           PROXY_ENV),
    Target("aiohttp-proxy", 18095, granian("benchmarks.reference_proxies:aiohttp_app", 18095),
           PROXY_ENV),
    Target("naive-starlette", 18096, granian("benchmarks.reference_proxies:naive_app", 18096),
           PROXY_ENV, setup=True),
    Target("tollway-gateway", 18097, granian("benchmarks.gateway_target:app", 18097),
           setup=True),
    Target("tollway-gateway-nolog", 18098, granian("benchmarks.gateway_target:app", 18098),
           {"BENCH_ACCESS_LOG": "0"}, setup=True),
    Target("tollway-httpx", 18094, granian("benchmarks.bench_proxy:httpx_app", 18094), PROXY_ENV),
]
DEFAULT_TARGETS = ("direct", "nginx", "naive-starlette", "tollway-proxy", "tollway-gateway")


# --- the ASGI apps under test (served by granian --factory) ---

Message = MutableMapping[str, Any]


async def _lifespan(receive: Any, send: Any, on_shutdown: Callable[[], Any]) -> None:
    await receive()
    await send({"type": "lifespan.startup.complete"})
    await receive()
    await on_shutdown()
    await send({"type": "lifespan.shutdown.complete"})


def _upstream() -> str:
    return load_settings().upstream or UPSTREAM


def proxy_app() -> Callable[..., Any]:
    """Tollway's proxy alone: no tenant resolution, auth, admission or emission."""
    proxy = Proxy(load_settings())
    upstream = _upstream()

    async def app(scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, proxy.close)
            return
        await proxy.forward(
            scope, receive, send, upstream=upstream, path=scope["raw_path"],
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
        url = upstream + scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        request = client.build_request(scope["method"], url, headers=headers,
                                       content=body)
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

    # SIGTERM (`timeout`, kill) must run the cleanup below too: a target left listening
    # would share its port (SO_REUSEPORT) with the next run's and take part of its traffic.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield start
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in started:
            with_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in started:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with_group(proc, signal.SIGKILL)
                proc.wait()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def port_free(port: int) -> None:
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", port)) == 0:
            raise SystemExit(f"port {port} is already in use: a process from an earlier run?")


def with_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def wait_ready(url: str, headers: dict[str, str] | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - loopback
    while True:
        try:
            with urllib.request.urlopen(request, timeout=1) as resp:  # noqa: S310 - loopback
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up")
        time.sleep(0.1)


def private_redis(start: Starter, workdir: Path) -> str:
    """A redis-server of the run's own: the shared one on 6379 also serves other jobs, whose
    long scripts stall every client for tens of milliseconds (RESULTS.md)."""
    start("redis", ["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1",
                    "--save", "", "--appendonly", "no", "--dir", str(workdir)], {}, workdir)
    deadline = time.monotonic() + 10
    while subprocess.run(["redis-cli", "-p", str(REDIS_PORT), "ping"], capture_output=True,
                         text=True).stdout.strip() != "PONG":
        if time.monotonic() > deadline:
            raise RuntimeError("redis-server did not come up")
        time.sleep(0.1)
    return f"redis://127.0.0.1:{REDIS_PORT}/0"


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@dataclass
class Started:
    """The targets of one run, up and ready, and the keys the gateway target accepts."""

    targets: list[Target]
    procs: dict[str, subprocess.Popen[bytes]]
    prepared: gateway_target.Prepared | None


def start_targets(start: Starter, run: Run, names: Sequence[str]) -> Started:
    chosen = [t for t in TARGETS if t.name in names]
    for port in [ORIGIN_PORT, REDIS_PORT, *(t.port for t in chosen)]:
        port_free(port)
    start("origin", nginx("origin", ORIGIN_PORT)(Run(run.workdir)), {}, run.workdir)
    wait_ready(f"{UPSTREAM}/")
    prepared: gateway_target.Prepared | None = None
    if any(t.setup for t in chosen):
        redis_url = run.redis_url or private_redis(start, run.workdir)
        prepared = gateway_target.prepare(run.workdir, upstream=UPSTREAM, redis_url=redis_url)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for target in chosen:
        env = dict(target.env)
        if target.setup and prepared is not None:
            env.update(prepared.env)
            env.update(run.gateway_env)
        if target.start is not None:
            procs[target.name] = start(target.name, target.start(run), env, run.workdir)
    key = {gateway_target.KEY_HEADER: prepared.keys[0]} if prepared else {}
    for target in chosen:
        wait_ready(f"http://127.0.0.1:{target.port}/", key)
    return Started(chosen, procs, prepared)


# --- throughput ---

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def wrk(
    port: int, connections: int, threads: int, seconds: int, script: Path | None = None
) -> dict[str, Any]:
    extra = ["-s", str(script)] if script else []
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", *extra,
         f"http://127.0.0.1:{port}/"],
        check=True, capture_output=True, text=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    result: dict[str, Any] = {"rps": rps, "errors": 0.0}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        result[f"p{pct}"] = float(m[1]) * _UNITS[m[2]] if m else float("nan")
    for pattern in (r"Non-2xx or 3xx responses: (\d+)", r"Socket errors: connect (\d+)"):
        m = re.search(pattern, out)
        result["errors"] += float(m[1]) if m else 0.0
    m = re.search(r"^statuses:(.*)$", out, re.M)  # printed by the key-rotating script
    result["statuses"] = m[1].strip() if m else ""
    return result


def throughput(args: argparse.Namespace) -> None:
    ensure_tools()
    names = args.only or DEFAULT_TARGETS
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp, processes() as start:
        run = Run(Path(tmp), args.workers, tuple(shlex.split(args.granian)),
                  dict(pair.split("=", 1) for pair in args.env), args.redis_url)
        up = start_targets(start, run, names)
        script = up.prepared.wrk_script if up.prepared else None
        results: dict[str, dict[str, Any]] = {}
        for target in up.targets:
            wrk(target.port, args.connections, args.threads, 2, script)  # warm-up
            sampler = None
            if args.profile == target.name:
                sampler = profile_start(up.procs[target.name], run.workdir, args.duration)
            workers = worker_pids(up.procs[target.name].pid) if target.name in up.procs else []
            cpu_before = cpu_seconds(workers)
            results[target.name] = r = wrk(target.port, args.connections, args.threads,
                                           args.duration, script)
            served = r["rps"] * args.duration
            r["cpu_us"] = (cpu_seconds(workers) - cpu_before) / served * 1e6 if workers else 0
            r["load"] = float(load_average().split()[0])
            print(f"  {target.name}: {r['rps']:.0f} req/s, p99 {r['p99']:.2f} ms, "
                  f"{r['cpu_us']:.0f} CPU µs/req {r['statuses']} (load {load_average()})",
                  flush=True)
            if sampler is not None:
                profile_report(sampler, run.workdir)
    report(results, args)


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    nginx_rps = results.get("nginx", {}).get("rps")
    direct_rps = results.get("direct", {}).get("rps")
    print(f"\nwrk -t{args.threads} -c{args.connections} -d{args.duration}s, origin: nginx "
          f"fixed 200 (1 worker); proxies: {args.workers} worker(s) each; "
          f"granian options: {args.granian or '(defaults)'}\n")
    print("| target | req/s | p50 ms | p99 ms | vs nginx | vs direct | CPU µs/req | non-2xx "
          "| statuses | load |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for name, r in results.items():
        vs_nginx = f"{r['rps'] / nginx_rps:.2f}" if nginx_rps else "-"
        vs_direct = f"{r['rps'] / direct_rps:.2f}" if direct_rps else "-"
        cpu = f"{r['cpu_us']:.0f}" if r["cpu_us"] else "-"
        print(f"| {name} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {vs_nginx} "
              f"| {vs_direct} | {cpu} | {r['errors']:.0f} | {r['statuses']} | {r['load']:.1f} |")


# --- where the time goes (py-spy) ---

def worker_pids(main_pid: int, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{main_pid}/task/{main_pid}/children").read_text().split()
        if children:
            return [int(c) for c in children]
        time.sleep(0.1)
    raise RuntimeError("granian worker did not start")


def cpu_seconds(pids: Sequence[int]) -> float:
    """User plus system CPU time of the processes; unlike req/s, CPU per request hardly
    moves when other jobs compete for the cores."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def worker_pid(main_pid: int, timeout: float = 10.0) -> int:
    return worker_pids(main_pid, timeout)[0]


def profile_start(
    proc: subprocess.Popen[bytes], workdir: Path, seconds: int
) -> subprocess.Popen[bytes]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen(
        [py_spy, "record", "--gil", "--nonblocking", "--format", "raw", "--rate", "250",
         "--duration", str(seconds), "--pid", str(worker_pid(proc.pid)),
         "--output", str(workdir / "profile.txt")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def profile_report(sampler: subprocess.Popen[bytes], workdir: Path, top: int = 25) -> None:
    """Share of GIL-holding samples per function: `self` where it was the innermost frame,
    `total` anywhere on the stack. Frames are `function (file:line)`; lines are folded away.
    Time inside uvloop's C loop shows as `self` of granian's worker entry frame."""
    sampler.wait(timeout=30)
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in (workdir / "profile.txt").read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack.strip():
            continue
        n = int(count)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        samples += n
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    print(f"\n  py-spy: {samples} samples of the worker holding the GIL")
    print("  self%  function")
    for frame, n in own.most_common(top):
        print(f"  {100 * n / samples:5.1f}  {frame}")
    print("  total%  function (below the worker's entry frames)")
    entry = max(total.values())
    for frame, n in [(f, n) for f, n in total.most_common() if n < entry][:top]:
        print(f"  {100 * n / samples:5.1f}  {frame}")
    shutil.copy(workdir / "profile.txt", Path(tempfile.gettempdir()) / "tollway-profile.txt")


# --- latency at a fixed rate (open loop) ---

async def open_loop(
    url: str, rate: int, seconds: int, keys: Sequence[str]
) -> dict[str, Any]:
    """Send `rate` requests/s on a fixed schedule for `seconds`; each latency runs from the
    request's scheduled moment to the end of its response. A request gets 10 s at most, so
    a saturated target ends the run with timeouts instead of a queue that never drains;
    `lag` is how far the generator itself fell behind its schedule."""
    import aiohttp

    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    failures = 0
    lag = 0.0
    connector = aiohttp.TCPConnector(limit=512, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(due: float, headers: dict[str, str]) -> None:
            nonlocal failures
            try:
                async with session.get(url, headers=headers) as resp:
                    await resp.read()
                    statuses[resp.status] += 1
            except (aiohttp.ClientError, TimeoutError):
                failures += 1
                return
            latencies.append(time.perf_counter() - due)

        tasks: set[asyncio.Task[None]] = set()
        total = rate * seconds
        began = time.perf_counter()
        for i in range(total):
            due = began + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                lag = max(lag, -delay)
            headers = {gateway_target.KEY_HEADER: keys[i % len(keys)]} if keys else {}
            task = asyncio.create_task(one(due, headers))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    latencies = sorted(latencies) or [float("nan")]
    ok = statuses.get(200, 0)

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return {"p50": pct(0.50), "p99": pct(0.99), "max": latencies[-1] * 1000,
            "ok": ok, "other": sum(statuses.values()) - ok + failures, "sent": total,
            "lag": lag * 1000, "statuses": " ".join(f"{k}={v}" for k, v in sorted(statuses.items()))
            + (f" failed={failures}" if failures else "")}


def latency(args: argparse.Namespace) -> None:
    ensure_tools()
    names = args.only or DEFAULT_TARGETS
    with suppress(ImportError):
        import uvloop

        uvloop.install()
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp, processes() as start:
        run = Run(Path(tmp), args.workers, tuple(shlex.split(args.granian)),
                  dict(pair.split("=", 1) for pair in args.env), args.redis_url)
        up = start_targets(start, run, names)
        keys = up.prepared.keys if up.prepared else []
        results: dict[str, dict[str, Any]] = {}
        for target in up.targets:
            url = f"http://127.0.0.1:{target.port}/"
            asyncio.run(open_loop(url, args.rate, 2, keys))  # warm-up
            results[target.name] = r = asyncio.run(open_loop(url, args.rate, args.duration, keys))
            r["load"] = float(load_average().split()[0])
            print(f"  {target.name}: p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms, "
                  f"generator lag {r['lag']:.1f} ms, {r['statuses']} (load {load_average()})",
                  flush=True)
    base = results.get("direct", {}).get("p99")
    print(f"\nopen loop, {args.rate} req/s for {args.duration}s, aiohttp client; "
          f"proxies: {args.workers} worker(s); granian options: {args.granian or '(defaults)'}\n")
    print("| target | p50 ms | p99 ms | max ms | added p99 ms | 200s | other | generator lag ms "
          "| load |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        added = f"{r['p99'] - base:.2f}" if base is not None else "-"
        print(f"| {name} | {r['p50']:.2f} | {r['p99']:.2f} | {r['max']:.2f} | {added} "
              f"| {r['ok']:.0f} | {r['other']:.0f} | {r['lag']:.1f} | {r['load']:.1f} |")


# --- streaming memory ---

def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


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
        run = Run(Path(tmp))
        start("origin", granian("benchmarks.upstream:app", origin_port)(run), {}, run.workdir)
        proxy = start("proxy", granian("benchmarks.bench_proxy:proxy_app", proxy_port)(run),
                      env, run.workdir)
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


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--duration", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes for nginx proxy_pass and every granian target")
    parser.add_argument("--granian", default="",
                        help='extra granian options, e.g. "--loop uvloop --runtime-mode st"')
    parser.add_argument("--only", nargs="*", help=f"targets (default: {DEFAULT_TARGETS})")
    parser.add_argument("--env", nargs="*", default=[], metavar="TOLLWAY_X=V",
                        help="settings for the gateway targets, e.g. TOLLWAY_REDIS_TIMEOUT_MS=200")
    parser.add_argument("--redis-url", help="Redis for the gateway targets (default: a private "
                        "redis-server; the shared one is redis://127.0.0.1:6379/13)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    tp = sub.add_parser("throughput")
    tp.add_argument("-c", "--connections", type=int, default=64)
    tp.add_argument("-t", "--threads", type=int, default=2)
    tp.add_argument("--profile", help="target name to sample with py-spy while wrk runs")
    _common(tp)
    lat = sub.add_parser("latency")
    lat.add_argument("--rate", type=int, default=1000)
    _common(lat)
    st = sub.add_parser("stream")
    st.add_argument("--size", type=int, default=2**30)
    args = parser.parse_args()
    if args.mode == "throughput":
        throughput(args)
    elif args.mode == "latency":
        latency(args)
    else:
        stream(args)


if __name__ == "__main__":
    main()
