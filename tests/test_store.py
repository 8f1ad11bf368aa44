from sqlalchemy import inspect

from tenancy.store import current_revision, migrate, normalise_url, open_engine


def test_migrate_is_idempotent_on_both_backends(database_url: str) -> None:
    engine = open_engine(database_url)
    first = migrate(engine)
    second = migrate(engine)
    assert first == second == current_revision(engine)
    names = set(inspect(engine).get_table_names())
    assert {"tenants", "plans", "api_keys", "admin_tokens", "audit_events"} <= names


def test_postgres_urls_use_psycopg3() -> None:
    assert normalise_url("postgresql://u@h/db").startswith("postgresql+psycopg://")
    assert normalise_url("sqlite:///x.db") == "sqlite:///x.db"
