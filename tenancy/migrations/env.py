"""Alembic environment: runs against the engine handed over by `tenancy.store.migrate`."""

from alembic import context

from tenancy.tables import metadata

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    context.run_migrations()
