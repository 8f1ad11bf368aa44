"""The control-plane schema as SQLAlchemy Core tables.

Alembic migrations in `tenancy/migrations/` create these; the tables here are what queries
are written against. Secrets appear only as SHA-256 hex digests.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
)

metadata = MetaData()

plans = Table(
    "plans",
    metadata,
    Column("plan_id", String(40), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("name", String(100), nullable=False),
    Column("price", Numeric(12, 2), nullable=True),
    Column("currency", String(3), nullable=False),
    Column("interval", String(10), nullable=False),
    Column("trial_days", Integer, nullable=False),
    Column("limits", JSON, nullable=False),
    Column("quotas", JSON, nullable=False),
    Column("features", JSON, nullable=False),
    Column("upstream", Text, nullable=True),
    Column("digest", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

tenants = Table(
    "tenants",
    metadata,
    Column("id", String(27), primary_key=True),
    Column("name", String(100), nullable=False),
    Column("email", String(254), nullable=False),
    Column("plan_id", String(40), nullable=False),
    Column("plan_version", Integer, nullable=False),
    Column("status", String(20), nullable=False),
    Column("region", String(40), nullable=False),
    Column("locale", String(35), nullable=False),
    Column("timezone", String(64), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("metadata", JSON, nullable=False),
    Column("settings", JSON, nullable=False),
    Column("subdomain", String(63), nullable=True, unique=True),
    Column("upstream", Text, nullable=True),
    Column("trial_ends_at", DateTime(timezone=True), nullable=True),
    Column("grace_ends_at", DateTime(timezone=True), nullable=True),
    Column("status_changed_at", DateTime(timezone=True), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    ForeignKeyConstraint(["plan_id", "plan_version"], ["plans.plan_id", "plans.version"]),
    Index("ix_tenants_status", "status"),
    Index("ix_tenants_plan", "plan_id"),
    Index("ix_tenants_name", "name"),
    Index("ix_tenants_created", "created_at", "id"),
)

domains = Table(
    "tenant_domains",
    metadata,
    Column("domain", String(253), primary_key=True),
    Column("tenant_id", String(27), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Index("ix_domains_tenant", "tenant_id"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant_id", String(27), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(100), nullable=False),
    Column("mode", String(4), nullable=False),
    Column("prefix", String(16), nullable=False),
    Column("hash", String(64), nullable=False, unique=True),
    Column("scopes", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("last_used_at", DateTime(timezone=True), nullable=True),
    Column("rotated_from", String(32), nullable=True),
    Index("ix_keys_tenant", "tenant_id"),
)

admin_tokens = Table(
    "admin_tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(100), nullable=False),
    Column("role", String(20), nullable=False),
    Column("tenant_id", String(27), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=True),
    Column("hash", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)

audit_events = Table(
    "audit_events",
    metadata,
    Column(
        "seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("id", String(36), nullable=False, unique=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("actor", String(120), nullable=False),
    Column("type", String(60), nullable=False),
    Column("tenant_id", String(27), nullable=True),
    Column("subject", String(80), nullable=False),
    Column("before", JSON, nullable=True),
    Column("after", JSON, nullable=True),
    Index("ix_audit_tenant", "tenant_id", "seq"),
    Index("ix_audit_type", "type"),
)

