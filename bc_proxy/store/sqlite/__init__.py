"""The embedded SQLite backend of the `Store` Protocol (one process per database file).

Modules by job: `schema` (versioned migrations), `engine` (connection, group commit, fsync,
checkpoints, reader thread), `sends`, `inbound`, `records` (poll leases), `push`, `upkeep`.
"""

from bc_proxy.store.sqlite.store import SQLiteStore

__all__ = ["SQLiteStore"]
