"""Configuration: frozen pydantic models in the shape of design.md section 2, and `load()`.

Owns `${VAR}` / `${VAR:-default}` expansion, validation and defaults. Secrets are `SecretStr`
so they never print. Does not own what the settings mean at run time.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

LEGACY_STATUS_CODES = ("SNT", "RCV", "NUR", "NRCV", "EXP", "ERR", "INF")

DEFAULT_STATUS_MAP: dict[int, str] = {1: "RCV", 2: "NRCV", 4: "SNT", 8: "SNT", 16: "NUR"}


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _http_url(v: str | None) -> str | None:
    """Only http:// and https:// URLs are usable for callbacks and the public address."""
    if v is not None and not v.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return v


class ServerSettings(_Model):
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)
    public_url: str | None = None
    max_body_bytes: int = Field(65536, ge=1024)
    shutdown_timeout_seconds: float = Field(8, gt=0)
    metrics_port: int | None = Field(None, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)  # N processes on one port; N > 1 needs PostgreSQL
    read_timeout_seconds: float = Field(15, gt=0)  # headers and body must arrive within this
    tls_cert_file: str | None = None  # serve HTTPS with this certificate chain (PEM) ...
    tls_key_file: str | None = None  # ... and this private key (PEM); both or neither

    _public_url = field_validator("public_url")(_http_url)

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        return self


class UpstreamSettings(_Model):
    base_url: str = "https://websms.co.nz/api/connexus"
    timeout_seconds: float = Field(10, gt=0)
    max_connections: int = Field(100, ge=1)
    # Idle upstream connections are closed after this (below the usual server-side 60 s, so a
    # connection is not reused just as Connexus closes it).
    keepalive_seconds: float = Field(30, gt=0)
    mo_query_interval_seconds: float = Field(300, ge=0)  # 0 turns the missed-webhook sweep off
    # What a legacy retry of a send whose outcome is unknown (Connexus timed out or the gateway
    # died mid-call) is answered: 204 (never risk a duplicate SMS; the status record says
    # "unknown") or 500 (the client keeps retrying and being refused until an operator acts).
    unknown_retry_status: Literal[204, 500] = 204

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")


class StoreSettings(_Model):
    url: str = "sqlite:///bc-proxy.db"
    fsync: bool = False  # true: also survive power loss (one fsync per commit group)
    retention_days: float = Field(30, gt=0)  # consumed records and sends older than this go
    lease_seconds: float = Field(15, gt=0, le=600)  # a dead replica's claims come back after this

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if not v.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("must be sqlite:///path or postgresql://user:pw@host/db")
        return v


class WebhookSettings(_Model):
    secret: SecretStr
    register_on_start: bool = False
    # Optional hardening on top of the secret path: only these source networks (CIDR) ...
    allowed_sources: tuple[str, ...] = ()
    # ... and/or an HMAC-SHA256 of the raw body, hex, in this header, keyed by hmac_secret.
    hmac_secret: SecretStr | None = None
    hmac_header: str = "X-Connexus-Signature"

    @field_validator("allowed_sources")
    @classmethod
    def _networks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not an IP network (CIDR)") from None
        return v

    @field_validator("secret", "hmac_secret")
    @classmethod
    def _long_enough(cls, v: SecretStr | None) -> SecretStr | None:
        # An empty hmac_secret (an empty ${VAR}) would make every signature forgeable.
        if v is not None and len(v.get_secret_value()) < 8:
            raise ValueError("must be at least 8 characters")
        return v


class LegacyCredentials(_Model):
    user_id: str = Field(min_length=1)
    password: SecretStr | None = None
    password_hash: SecretStr | None = None

    @field_validator("password", "password_hash")
    @classmethod
    def _not_empty(cls, v: SecretStr | None) -> SecretStr | None:
        # An unset-but-empty ${VAR} must not make an empty password valid.
        if v is not None and not v.get_secret_value():
            raise ValueError("must not be empty (is its environment variable empty?)")
        return v

    @model_validator(mode="after")
    def _one_password(self) -> LegacyCredentials:
        if (self.password is None) == (self.password_hash is None):
            raise ValueError("set exactly one of password or password_hash")
        if self.password_hash is not None and not self.password_hash.get_secret_value().startswith(
            "$argon2"
        ):
            raise ValueError("password_hash must be an argon2 hash (bc-proxy hash-password)")
        return self


class ConnexusCredentials(_Model):
    client_id: str | None = None
    client_secret: SecretStr | None = None
    user_id: str | None = None
    password: SecretStr | None = None

    @field_validator("client_secret", "password")
    @classmethod
    def _not_empty(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value():
            raise ValueError("must not be empty (is its environment variable empty?)")
        return v

    @model_validator(mode="after")
    def _one_mode(self) -> ConnexusCredentials:
        token = self.client_id is not None or self.client_secret is not None
        pw = self.user_id is not None or self.password is not None
        if token == pw:
            raise ValueError("set client_id/client_secret (token auth) or user_id/password")
        if token and (not self.client_id or self.client_secret is None):
            raise ValueError("token auth needs both client_id and client_secret")
        if pw and (not self.user_id or self.password is None):
            raise ValueError("password auth needs both user_id and password")
        return self

    @property
    def token_auth(self) -> bool:
        return self.client_id is not None


class PushSettings(_Model):
    incoming_url: str | None = None
    status_url: str | None = None
    keep_for_polling: bool = False
    max_age_hours: float = Field(48, gt=0)
    timeout_seconds: float = Field(10, gt=0)
    retry_initial_seconds: float = Field(5, gt=0)  # first retry delay; doubles per attempt
    retry_max_seconds: float = Field(900, gt=0)  # the longest delay between two attempts

    _urls = field_validator("incoming_url", "status_url")(_http_url)


DEFAULT_PASSTHROUGH = ("sms/balance", "sms/otp", "sms/appointment", "number/lookup", "mo/query")


class InboundSettings(_Model):
    mode: Literal["webhook", "pull"] = "webhook"  # pull: mo/query + sms/status, no webhook needed
    pull_interval_seconds: float = Field(30, gt=0)


class TenantSettings(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,40}$")
    legacy: LegacyCredentials
    connexus: ConnexusCredentials
    default_from: str | None = None
    senders: tuple[str, ...] = ()
    poll_wait_seconds: float = Field(30, ge=0, le=300)
    push: PushSettings | None = None
    status_map: dict[int, str] = Field(default_factory=dict)
    webhook_secret: SecretStr | None = None  # this account's own /webhooks/connexus/{secret}
    idempotency_window_seconds: float = Field(86400, ge=0)  # a retried send is not sent again
    opt_out: bool = True  # incoming STOP blocks the handset for this tenant, START unblocks
    inbound: InboundSettings = InboundSettings()
    passthrough: tuple[str, ...] = DEFAULT_PASSTHROUGH  # the /api/connexus/{path} allowlist
    send_rate_per_second: float | None = Field(None, gt=0)  # optional: legacy sends above -> 429
    send_burst: int = Field(20, ge=1)  # sends allowed at once above the rate

    @field_validator("webhook_secret")
    @classmethod
    def _secret_long_enough(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 8:
            raise ValueError("must be at least 8 characters")
        return v

    @field_validator("status_map")
    @classmethod
    def _legacy_codes(cls, v: dict[int, str]) -> dict[int, str]:
        for code, legacy in v.items():
            if legacy not in LEGACY_STATUS_CODES:
                raise ValueError(
                    f"{code}: {legacy!r} is not one of {', '.join(LEGACY_STATUS_CODES)}"
                )
        return v

    @field_validator("senders")
    @classmethod
    def _no_plus(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(s.lstrip("+") for s in v)


class LogSettings(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    requests: bool = True  # one line per legacy/webhook request

    @field_validator("level", mode="before")
    @classmethod
    def _any_case(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v


class ConsoleSettings(_Model):
    user: str = Field(min_length=1)
    password_hash: SecretStr

    @field_validator("password_hash")
    @classmethod
    def _argon2(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value().startswith("$argon2"):
            raise ValueError("must be an argon2 hash (bc-proxy hash-password)")
        return v


class Settings(_Model):
    server: ServerSettings = ServerSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    store: StoreSettings = StoreSettings()
    webhook: WebhookSettings
    tenants: tuple[TenantSettings, ...]
    status_map: dict[int, str] = Field(default_factory=dict)
    log: LogSettings = LogSettings()
    console: ConsoleSettings | None = None  # operator console at /console, off unless present

    @field_validator("tenants")
    @classmethod
    def _at_least_one(cls, v: tuple[TenantSettings, ...]) -> tuple[TenantSettings, ...]:
        # Not Field(min_length=1): pydantic would add it after any invalid tenant, as noise.
        if not v:
            raise ValueError("at least one tenant is needed")
        return v

    @model_validator(mode="after")
    def _unique(self) -> Settings:
        for attr in ("name",):
            seen: set[str] = set()
            for t in self.tenants:
                value = getattr(t, attr)
                if value in seen:
                    raise ValueError(f"tenants: duplicate {attr} {value!r}")
                seen.add(value)
        users: dict[str, str] = {}
        for t in self.tenants:
            first = users.setdefault(t.legacy.user_id, t.name)
            if first != t.name:
                raise ValueError(
                    f"tenants: legacy user_id {t.legacy.user_id!r} belongs to {first} and {t.name}"
                )
        owners: dict[str, str] = {}
        for t in self.tenants:
            for s in t.senders:
                if s in owners:
                    raise ValueError(f"tenants: sender {s!r} belongs to {owners[s]} and {t.name}")
                owners[s] = t.name
        for code, legacy in self.status_map.items():
            if legacy not in LEGACY_STATUS_CODES:
                raise ValueError(f"status_map: {code}: {legacy!r} is not a legacy status code")
        secrets = {self.webhook.secret.get_secret_value(): "webhook.secret"}
        for t in self.tenants:
            if t.webhook_secret is None:
                continue
            value = t.webhook_secret.get_secret_value()
            if value in secrets:
                raise ValueError(
                    f"tenants[{t.name}].webhook_secret: the same as {secrets[value]}"
                )
            secrets[value] = f"tenants[{t.name}].webhook_secret"
        kept = self.store.retention_days * 86400
        for t in self.tenants:
            if t.idempotency_window_seconds > kept:  # purged sends are no longer recognised
                raise ValueError(
                    f"tenants[{t.name}].idempotency_window_seconds: "
                    f"{t.idempotency_window_seconds:g} s is longer than store.retention_days "
                    f"({self.store.retention_days:g} days keep {kept:g} s): a retry after its "
                    "send was purged would be sent again"
                )
        if self.server.workers > 1 and self.store.url.startswith("sqlite:"):
            raise ValueError(
                "server.workers: more than one worker needs a postgresql:// store "
                "(one process owns a SQLite file)"
            )
        return self

    def status_map_for(self, tenant: TenantSettings) -> dict[int, str]:
        """Connexus statusCode -> legacy statusCode for one tenant (defaults, global, tenant)."""
        return {**DEFAULT_STATUS_MAP, **self.status_map, **tenant.status_map}


# Reading files lives in bc_proxy.configfile (split for size); re-exported here so callers keep
# `from bc_proxy.config import load, parse, ...`. Imported last: it needs the models above.
from bc_proxy.configfile import (  # noqa: E402
    expand_env,
    load,
    load_usable,
    parse,
    usability_problems,
)

__all__ = [
    "DEFAULT_PASSTHROUGH",
    "DEFAULT_STATUS_MAP",
    "LEGACY_STATUS_CODES",
    "ConnexusCredentials",
    "ConsoleSettings",
    "InboundSettings",
    "LegacyCredentials",
    "LogSettings",
    "PushSettings",
    "ServerSettings",
    "Settings",
    "StoreSettings",
    "TenantSettings",
    "UpstreamSettings",
    "WebhookSettings",
    "expand_env",
    "load",
    "load_usable",
    "parse",
    "usability_problems",
]
