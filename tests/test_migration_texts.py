"""Released PostgreSQL migrations never change (schema.py: "never edit a released migration").

A database records only the number of the last migration it ran. A migration whose text
changed after it shipped would leave databases migrated before and after the change with
different schemas under one version number. Some migrations are built from Python constants
(`SEND_FACTS_QUERY`, `lock_send_keys`, the lock classes), so editing a constant would change
a released migration without anyone touching it. Each text's digest is recorded here: a new
migration appends its own; a changed one fails.
"""

from __future__ import annotations

import hashlib

from bc_proxy.store.postgres import schema

RELEASED = [
    "d3b2402f725f8cda9749e5ac0bf6defc463f3cfb18725445f3946e42a31cee26",
    "c9f73d67ec712eb21ed5cc5b6dea8e8975196da70b76abfba5f01ec3063a60f3",
    "fe2ec4d94b791b536ecf1a6d2ebde00cd77f914858af58b31ed1b912d811ee23",
    "4e77e01b289635cb3470f298200aa1a302c93ca9898d1cc55f03ca2cc2550b45",
    "726ae5298c27ebdcc4a7b0c3cfe8ffc798aabe574ca78bddb682277c47d8288b",
    "b41933c33fd9c854b72d980cf24982388978458626886e9d544ba72fe37681bf",
    "2ca8f3130d39e3319c30b2f4c9f0a1ae6d33f3300d391e5d44d9862bb26a9e08",
    "4cdff05ba4569e9af3b414573aa8203fbc37f5f8bbe47d30f86dcdf50e617868",
    "8b298bf8b8d6dca1a0aa8eb42075c19ca181d8405116287745df56fb99c0d88a",
    "20be8c93d6b334dfcaac802d0aaedfd909159cc26d19aea6dfca9bfbc122e246",
    "c3a110598b79da4fe76f51d05301182507486a71143c559c0914eac0a1533193",
]


def test_released_migrations_are_unchanged() -> None:
    digests = [hashlib.sha256(m.encode()).hexdigest() for m in schema.MIGRATIONS]
    assert len(digests) >= len(RELEASED), "a released migration was removed"
    changed = [n + 1 for n, (a, b) in enumerate(zip(digests, RELEASED, strict=False)) if a != b]
    assert changed == [], f"released migrations changed: {changed} (add a migration instead)"


def test_every_migration_is_recorded() -> None:
    # A new migration is recorded here when it is added, so that the test above guards it.
    assert len(schema.MIGRATIONS) == len(RELEASED)
