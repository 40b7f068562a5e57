"""The embedded SQLite backend of the `Store` Protocol (one process per database file).

Modules by job: `schema` (versioned migrations), `engine` (writer connection, group commit,
busy retry, fsync), `helpers` (reader and checkpoint threads), `sends`, `inbound`, `records`
(poll leases), `push`, `upkeep`.
"""

from bc_proxy.store.sqlite.store import SQLiteStore

__all__ = ["SQLiteStore"]
