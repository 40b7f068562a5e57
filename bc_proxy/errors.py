"""The one exception tree of bc-proxy, translated to legacy answers at the edge (edge.py).

    BcProxyError
    ├── ConfigError          invalid configuration (CLI exits non-zero with the message)
    ├── LegacyError          an answer for the legacy client: status + one-line reason
    │   ├── BadRequest       400 (also: malformed encoding, upstream 400)
    │   ├── Unauthorized     401
    │   ├── Forbidden        403 (insufficient funds upstream)
    │   ├── RequestTimeout   408 (the body did not arrive within server.read_timeout_seconds)
    │   ├── PayloadTooLarge  413
    │   ├── TooManyRequests  429 (a tenant's send rate limit)
    │   └── GatewayError     500 (upstream down/slow/5xx, our Connexus credentials refused)
    ├── ClientGone           the client went away mid-request: a 499 outcome, never a 500
    └── StoreError           the store could not do what was asked

Reasons are short, safe to show to a client, and never contain a secret.
"""

from __future__ import annotations


class BcProxyError(Exception):
    """Base of every error bc-proxy raises on purpose."""


class ConfigError(BcProxyError):
    """The configuration is invalid; the message names the offending key."""


class StoreError(BcProxyError):
    """The store failed (I/O, constraint, closed)."""


class StoreRefused(StoreError):
    """The store is up and refused this write's data (a constraint, a value it cannot hold):
    the same write would be refused again, unlike a timeout, a lock or a lost connection."""


class LegacyError(BcProxyError):
    """An error answer for the legacy client."""

    status = 500

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BadRequest(LegacyError):
    status = 400


class Unauthorized(LegacyError):
    status = 401


class Forbidden(LegacyError):
    status = 403


class RequestTimeout(LegacyError):
    status = 408


class PayloadTooLarge(LegacyError):
    status = 413


class TooManyRequests(LegacyError):
    status = 429


class ClientGone(BcProxyError):
    """The client closed the connection before its request was read or answered."""

    status = 499  # nginx's "client closed request": metrics and logs only, nothing is sent


class GatewayError(LegacyError):
    status = 500
