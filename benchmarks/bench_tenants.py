"""Control-plane benchmark: onboarding throughput and tenant list/search latency.

1. Onboard N tenants, each with one API key, on SQLite and on PostgreSQL (a fresh database
   for each path), two ways in the same run: the reference per-call path (`tenants.create`
   then `keys.create`, two transactions each) and `tenancy.onboarding.onboard` (one
   transaction per tenant and key; a thread pool on PostgreSQL). The two alternate in chunks
   of `--chunk` tenants so that load from other work hits both alike; each line gives wall
   time and this process's CPU time. `--sweep N` instead times
   `onboard` of N tenants at several worker counts on both backends.
2. On PostgreSQL, bulk-insert 100,000 tenants with executemany, then time `list_tenants`:
   the first page, a status filter, a plan filter, substring searches and deep cursor pages.

Run: PYTHONPATH=. .venv/bin/python benchmarks/bench_tenants.py [--tenants 10000]
     [--chunk 1000] [--rows 100000] [--onboarding-only] [--search-only] [--sweep 2000]
PostgreSQL is reached at TOLLWAY_BENCH_PG (default postgres@127.0.0.1:5432, trust auth); a
throwaway database is created and dropped. Change notifications are off (no Redis), so the
figures are the store's cost alone.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, insert, text

from tenancy import keys, onboarding, plans, tenants
from tenancy.controlplane import ControlPlane
from tenancy.ids import new_tenant_id
from tenancy.settings import load_settings
from tenancy.store import migrate, open_engine
from tenancy.tables import tenants as tenants_table

PG_ADMIN = os.environ.get(
    "TOLLWAY_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
WORDS = (
    "acme", "blue", "falcon", "north", "river", "summit", "quantum", "cedar", "harbor", "nova",
    "orbit", "pixel", "atlas", "delta", "ember", "granite", "lumen", "maple", "vertex", "willow",
)
SUFFIXES = ("Labs", "Inc", "GmbH", "Ltd", "Systems", "Cloud", "Partners", "Works")


@contextmanager
def pg_database() -> Iterator[str]:
    name = f"tw_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def open_plane(url: str, data_dir: Path) -> ControlPlane:
    settings = load_settings(env={}, data_dir=data_dir, database_url=url)
    migrate(open_engine(settings.effective_database_url))
    cp = ControlPlane.open(settings, with_redis=False)
    plans.ensure_defaults(cp)
    return cp


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def specs(count: int, first: int = 0) -> list[dict[str, object]]:
    return [
        {"name": f"{random.choice(WORDS).title()} Bench {i}", "email": f"owner{i}@bench.example",
         "plan": random.choice(("starter", "professional"))}
        for i in range(first, first + count)
    ]


@dataclass
class Run:
    """One onboarding path's running totals: wall and this process's CPU seconds."""

    name: str
    count: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    failed: int = 0
    samples: dict[str, list[float]] = field(default_factory=lambda: {"tenant": [], "key": []})

    def line(self, extra: str = "") -> str:
        rate = self.count / self.wall
        out = (f"{self.count} tenants+keys in {self.wall:.1f} s = {rate:,.0f}/s, process CPU "
               f"{self.cpu:.1f} s ({self.cpu / self.count * 1e3:.2f} ms/tenant){extra}")
        if self.samples["tenant"]:
            t, k = self.samples["tenant"], self.samples["key"]
            out += (f"; tenants.create p50 {pct(t, 0.5) * 1e3:.2f} ms p95 {pct(t, 0.95) * 1e3:.2f}"
                    f" ms; keys.create p50 {pct(k, 0.5) * 1e3:.2f} ms p95 "
                    f"{pct(k, 0.95) * 1e3:.2f} ms")
        return out


def per_call(cp: ControlPlane, batch: list[dict[str, object]], into: Run) -> None:
    """The reference: `tenants.create` then `keys.create`, two transactions per tenant."""
    start, cpu = time.perf_counter(), time.process_time()
    for spec in batch:
        t0 = time.perf_counter()
        tenant = tenants.create(cp, actor="bench", **spec)  # type: ignore[arg-type]
        t1 = time.perf_counter()
        keys.create(cp, tenant["id"], actor="bench")
        into.samples["tenant"].append(t1 - t0)
        into.samples["key"].append(time.perf_counter() - t1)
    into.wall += time.perf_counter() - start
    into.cpu += time.process_time() - cpu
    into.count += len(batch)


def bulk(
    cp: ControlPlane, batch: list[dict[str, object]], into: Run, workers: int | None = None
) -> None:
    """`onboarding.onboard`: one transaction per tenant and its key."""
    start, cpu = time.perf_counter(), time.process_time()
    results = onboarding.onboard(cp, batch, actor="bench", workers=workers)
    into.wall += time.perf_counter() - start
    into.cpu += time.process_time() - cpu
    into.count += len(batch)
    into.failed += sum(r.problem is not None for r in results)


@contextmanager
def fresh_plane(backend: str, tmp: Path) -> Iterator[ControlPlane]:
    if backend == "SQLite":
        cp = open_plane(f"sqlite:///{tmp}/bench-{uuid.uuid4().hex[:6]}.db", tmp)
        yield cp
        cp.close()
        return
    with pg_database() as url:
        cp = open_plane(url, tmp)
        yield cp
        cp.close()


def compare(count: int, chunk: int) -> None:
    """Both paths on their own fresh database, alternating in chunks, so a load swing from
    other work on a shared box hits both alike."""
    for backend in ("SQLite", "PostgreSQL"):
        with tempfile.TemporaryDirectory() as tmp, fresh_plane(backend, Path(tmp)) as ref_cp, \
                fresh_plane(backend, Path(tmp)) as new_cp:
            ref, new = Run("per-call"), Run("onboard")
            loads = []
            for first in range(0, count, chunk):
                batch = specs(min(chunk, count - first), first)
                per_call(ref_cp, batch, ref)
                bulk(new_cp, batch, new)
                loads.append(os.getloadavg()[0])
            workers = onboarding.POSTGRES_WORKERS if backend == "PostgreSQL" else 1
            print(f"{backend}, load average {min(loads):.1f}-{max(loads):.1f} during the run")
            print(f"  per-call reference: {ref.line()}")
            print(f"  onboard ({workers} worker(s), {new.failed} failed): {new.line()}")
            print(f"  onboard / per-call throughput: {ref.wall / new.wall:.2f}x")


def sweep(count: int) -> None:
    for backend in ("SQLite", "PostgreSQL"):
        for workers in (1, 2, 4, 8, 16):
            with tempfile.TemporaryDirectory() as tmp, fresh_plane(backend, Path(tmp)) as cp:
                before = os.getloadavg()[0]
                run = Run("onboard")
                bulk(cp, specs(count), run, workers)
                print(f"{backend} onboard workers={workers} (load {before:.1f} -> "
                      f"{os.getloadavg()[0]:.1f}): {run.line()}")


def bulk_rows(count: int) -> Iterator[list[dict[str, object]]]:
    base = datetime(2025, 1, 1, tzinfo=UTC)
    statuses = ("active",) * 14 + ("trial",) * 3 + ("past_due", "suspended", "cancelled")
    chunk: list[dict[str, object]] = []
    for i in range(count):
        words = f"{random.choice(WORDS).title()} {random.choice(WORDS).title()}"
        name = f"{words} {random.choice(SUFFIXES)} {i}"
        at = base + timedelta(seconds=i * 300 + random.randint(0, 299))
        chunk.append({
            "id": new_tenant_id(name), "name": name,
            "email": f"billing{i}@{random.choice(WORDS)}{i % 997}.example",
            "plan_id": random.choice(("starter", "starter", "professional", "enterprise")),
            "plan_version": 1, "status": random.choice(statuses), "region": "us-east-1",
            "locale": "en-US", "timezone": "UTC", "currency": "USD", "metadata": {},
            "settings": {}, "subdomain": None, "upstream": None, "trial_ends_at": None,
            "grace_ends_at": None, "status_changed_at": at, "created_at": at, "updated_at": at,
        })
        if len(chunk) == 10_000:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def timed(cp: ControlPlane, runs: int, **query: object) -> tuple[float, float, int]:
    samples = []
    with cp.engine.connect() as conn:
        for _ in range(runs + 1):
            t0 = time.perf_counter()
            items, _ = tenants.list_tenants(conn, **query)  # type: ignore[arg-type]
            samples.append(time.perf_counter() - t0)
    samples = samples[1:]  # the first run warms the connection
    return statistics.median(samples) * 1e3, pct(samples, 0.95) * 1e3, len(items)


def search_scale(cp: ControlPlane, rows: int, runs: int) -> list[str]:
    start = time.perf_counter()
    with cp.engine.begin() as conn:
        for chunk in bulk_rows(rows):
            conn.execute(insert(tenants_table), chunk)
    # What autovacuum does in steady state: merge the GIN pending list and gather stats.
    with cp.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE tenants"))
    lines = [f"bulk insert of {rows:,} tenants (+ VACUUM ANALYZE): "
             f"{time.perf_counter() - start:.1f} s", ""]
    with cp.engine.connect() as conn:
        cursor = None
        for _ in range(rows // 2 // 500):
            _, cursor = tenants.list_tenants(conn, limit=500, cursor=cursor)
    cases: list[tuple[str, dict[str, object]]] = [
        ("first page", {}),
        ("status=suspended", {"status": "suspended"}),
        ("plan=enterprise", {"plan": "enterprise"}),
        ("q='falcon' (word in ~10% of names)", {"q": "falcon"}),
        ("q='cedar maple' (~0.25%)", {"q": "cedar maple"}),
        ("q='77777' (rare)", {"q": "77777"}),
        ("q='billing4242@' (an email)", {"q": "billing4242@"}),
        ("q='nomatchzz' (no row)", {"q": "nomatchzz"}),
        ("page at row 50,000 (cursor)", {"cursor": cursor}),
        ("status=active, page past row 50,000", {"status": "active", "cursor": cursor}),
        ("q='falcon', page past row 50,000", {"q": "falcon", "cursor": cursor}),
    ]
    lines += ["| list_tenants (limit 50) | rows | p50 ms | p95 ms |", "|---|---|---|---|"]
    for label, query in cases:
        p50, p95, found = timed(cp, runs, **query)
        lines.append(f"| {label} | {found} | {p50:.2f} | {p95:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--chunk", type=int, default=1000,
                        help="the two onboarding paths alternate in chunks of this many")
    parser.add_argument("--search-only", action="store_true", help="skip onboarding")
    parser.add_argument("--onboarding-only", action="store_true", help="skip list/search")
    parser.add_argument("--sweep", type=int, default=0,
                        help="only time onboard of this many tenants at 1-16 workers")
    args = parser.parse_args()
    random.seed(7)
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    if args.sweep:
        sweep(args.sweep)
        return
    if not args.search_only:
        compare(args.tenants, args.chunk)
    if args.onboarding_only:
        print(f"load average after: {os.getloadavg()[0]:.1f}")
        return
    with pg_database() as url, tempfile.TemporaryDirectory() as tmp:
        cp = open_plane(url, Path(tmp))
        print("\n".join(search_scale(cp, args.rows, args.runs)))
        cp.close()
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
