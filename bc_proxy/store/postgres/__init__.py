"""The PostgreSQL backend of the store: many replicas on one database.

Owns nothing itself: `store.py` is the `Store` implementation, `schema.py` the versioned
migrations, `sends.py` / `inbound.py` / `records.py` / `push.py` the SQL of each flow,
`listener.py` the LISTEN/NOTIFY wake-ups and `db.py` the pool and error mapping.
"""

from bc_proxy.store.postgres.store import PostgresStore

__all__ = ["PostgresStore"]
