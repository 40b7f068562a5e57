"""Configuration: the design.md section 2 shape, `${VAR}` expansion, the documented example,
the minimal test config, and ConfigError messages that name the offending key."""

# ruff: noqa: E501 - DESIGN_YAML is copied verbatim from design.md, long comment lines included.

from __future__ import annotations

import copy
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from bc_proxy.config import DEFAULT_STATUS_MAP, Settings, expand_env, load, parse
from bc_proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "bc-proxy.example.yaml"
MINIMAL = ROOT / "config" / "test-minimal.yaml"

ENV = {
    "BC_PROXY_WEBHOOK_SECRET": "whsec-0123456789",
    "ACME_LEGACY_PASSWORD": "acme-legacy-pass",
    "ACME_CONNEXUS_SECRET": "csk_acme_secret",
}

# design.md section 2, verbatim: tests outside the project write configs of this shape.
DESIGN_YAML = """\
server:
  host: 0.0.0.0
  port: 8080
  public_url: https://sms-gw.example.org   # optional; used to register the webhook upstream
  max_body_bytes: 65536
  shutdown_timeout_seconds: 8
upstream:
  base_url: https://websms.co.nz/api/connexus
  timeout_seconds: 10
  max_connections: 100
store:
  url: sqlite:////var/lib/bc-proxy/bc-proxy.db  # SQLAlchemy-style: sqlite:///rel.db is relative, sqlite:////abs.db absolute;
                                                # default sqlite:///bc-proxy.db ; or postgresql://user:pw@host/db
webhook:
  secret: ${BC_PROXY_WEBHOOK_SECRET}            # the {secret} path segment, compared in constant time
  register_on_start: false                      # POST {public_url}/webhooks/connexus/{secret} to Connexus /configure
tenants:
  - name: acme                                  # label in logs and metrics (bounded set)
    legacy:
      user_id: acme-legacy
      password: ${ACME_LEGACY_PASSWORD}         # or password_hash: "$argon2id$..." (bc-proxy hash-password)
    connexus:
      client_id: cid_xxx                        # token auth (preferred)...
      client_secret: ${ACME_CONNEXUS_SECRET}
      # user_id: ops@acme.example / password: ... (password auth, for accounts without API keys)
    default_from: "552"                         # optional sender ID when the legacy call has none
    senders: ["552", "2190"]                    # incoming SMS to these numbers belong to this tenant
    poll_wait_seconds: 30                       # legacy long-poll; 0 answers 204 at once
    push:                                       # optional; without it records wait for polling
      incoming_url: https://legacy.acme.example/sms-in
      status_url: https://legacy.acme.example/sms-status
      keep_for_polling: false                   # true: pushed records also stay pollable
"""

# Mutually exclusive settings the example can only show commented out next to the active one.
ALTERNATIVES = frozenset(
    {"tenants.legacy.password_hash", "tenants.connexus.user_id", "tenants.connexus.password"}
)
# Opt-in features: documented in the example, commented out so that it runs without them.
OPT_IN = frozenset(
    {
        "server.tls_cert_file",
        "server.tls_key_file",
        "webhook.allowed_sources",
        "webhook.hmac_secret",
        "webhook.hmac_header",
        "tenants.send_rate_per_second",
        "tenants.send_burst",
        "console",
        "console.user",
        "console.password_hash",
    }
)

ARGON2_HASH = "$argon2id$v=19$m=65536,t=3,p=4$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG"


# --- helpers -------------------------------------------------------------------------------


def _models(annotation: Any) -> Iterator[type[BaseModel]]:
    """The pydantic model classes inside a field annotation (through Optional, tuple, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _models(arg)


def _setting_paths(model: type[BaseModel] = Settings, prefix: str = "") -> list[str]:
    """Every dotted key of the Settings model tree, list items flattened (tenants.legacy.x)."""
    out: list[str] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        out.append(path)
        for sub in _models(field.annotation):
            out.extend(_setting_paths(sub, path + "."))
    return out


_KEY_LINE = re.compile(
    r"^(?P<indent>[ ]*)(?P<hash>#[ ]*)?(?P<dash>-[ ]+)?(?P<key>[A-Za-z_][A-Za-z0-9_]*):(?:[ ]|$)"
)


@dataclass(frozen=True)
class _Key:
    line: int
    column: int  # of the key; of the `#` for a commented-out key
    name: str
    commented: bool
    documented: bool  # a comment line itself, an inline comment, or a comment line just above


def _keys(text: str) -> list[_Key]:
    """Every line of a YAML file that holds a key, active or commented out."""
    lines = text.splitlines()
    out: list[_Key] = []
    for i, line in enumerate(lines):
        m = _KEY_LINE.match(line)
        if m is None:
            continue
        column = len(m["indent"]) + (len(m["dash"]) if m["dash"] and not m["hash"] else 0)
        above = lines[i - 1].lstrip() if i > 0 else ""
        commented = m["hash"] is not None
        documented = commented or "#" in line[m.end() :] or above.startswith("#")
        out.append(_Key(i, column, m["key"], commented, documented))
    return out


def _find(keys: list[_Key], path: str) -> list[_Key]:
    """The key lines for a dotted path, respecting YAML nesting by indentation."""
    block, parent_column = keys, -1
    found: list[_Key] = []
    for depth, segment in enumerate(path.split(".")):
        active = [k for k in block if not k.commented and k.column > parent_column]
        child_column = min((k.column for k in active), default=None)
        if child_column is None:  # a block that is only commented out
            child_column = min((k.column for k in block if k.column > parent_column), default=0)
        found = [k for k in block if k.name == segment and k.column == child_column]
        if not found:
            return []
        if depth < len(path.split(".")) - 1:
            owner = next((k for k in found if not k.commented), found[0])
            after = [k for k in keys if k.line > owner.line]
            end = next(
                (k.line for k in after if not k.commented and k.column <= owner.column),
                len(keys) + 10**9,
            )
            block = [k for k in after if k.line < end]
            parent_column = owner.column
    return found


def _has_path(data: Any, path: str) -> bool:
    """Whether a parsed YAML tree sets this dotted path (in any item of a list)."""
    head, _, rest = path.partition(".")
    if isinstance(data, list):
        return any(_has_path(item, path) for item in data)
    if not isinstance(data, dict) or head not in data:
        return False
    return not rest or _has_path(data[head], rest)


def _leaves(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, value) for every scalar leaf, list indexes kept: tenants.0.legacy.user_id."""
    if isinstance(data, dict) and data:
        for k, v in data.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        for i, v in enumerate(data):
            yield from _leaves(v, f"{prefix}{i}.")
    else:
        yield prefix.rstrip("."), data


def _get(data: Any, path: str) -> Any:
    for part in path.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def _delete(data: dict[str, Any], path: str) -> dict[str, Any]:
    out = copy.deepcopy(data)
    *parents, last = path.split(".")
    node: Any = out
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    del node[last]
    return out


def _two_tenants() -> dict[str, Any]:
    """A valid configuration with tenants acme and beta (errors are put in beta: index 1)."""
    return {
        "webhook": {"secret": "test-webhook-secret-0123"},
        "tenants": [
            {
                "name": "acme",
                "legacy": {"user_id": "acme-legacy", "password": "acme-pass"},
                "connexus": {"client_id": "cid_acme", "client_secret": "csk_acme"},
                "senders": ["552", "2190"],
            },
            {
                "name": "beta",
                "legacy": {"user_id": "beta-legacy", "password_hash": ARGON2_HASH},
                "connexus": {"user_id": "ops@beta.example", "password": "beta-upstream-pass"},
                "senders": ["3300"],
            },
        ],
    }


Mutation = Callable[[dict[str, Any]], None]


def _beta(**changes: Any) -> Mutation:
    def apply(cfg: dict[str, Any]) -> None:
        cfg["tenants"][1].update(changes)

    return apply


def _set(path: str, value: Any) -> Mutation:
    def apply(cfg: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = cfg
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    return apply


def _drop(path: str) -> Mutation:
    def apply(cfg: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = cfg
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        del node[last]

    return apply


# --- the design.md shape -------------------------------------------------------------------


def test_design_section_2_parses_with_env() -> None:
    """The design.md section 2 YAML validates once its three env vars are set, values intact."""
    settings = parse(yaml.safe_load(DESIGN_YAML), env=ENV)
    assert settings.server.public_url == "https://sms-gw.example.org"
    assert settings.server.shutdown_timeout_seconds == 8
    assert settings.store.url == "sqlite:////var/lib/bc-proxy/bc-proxy.db"
    assert settings.webhook.secret.get_secret_value() == ENV["BC_PROXY_WEBHOOK_SECRET"]
    assert settings.webhook.register_on_start is False
    (acme,) = settings.tenants
    assert acme.name == "acme"
    assert acme.legacy.user_id == "acme-legacy"
    assert acme.legacy.password is not None
    assert acme.legacy.password.get_secret_value() == ENV["ACME_LEGACY_PASSWORD"]
    assert acme.connexus.token_auth
    assert acme.connexus.client_secret is not None
    assert acme.connexus.client_secret.get_secret_value() == ENV["ACME_CONNEXUS_SECRET"]
    assert acme.default_from == "552"
    assert acme.senders == ("552", "2190")
    assert acme.poll_wait_seconds == 30
    assert acme.push is not None
    assert acme.push.incoming_url == "https://legacy.acme.example/sms-in"
    assert acme.push.status_url == "https://legacy.acme.example/sms-status"
    assert acme.push.keep_for_polling is False
    assert settings.status_map_for(acme) == DEFAULT_STATUS_MAP


def test_design_section_2_without_env_names_variable_and_key() -> None:
    """With its env vars unset the design YAML fails, naming the variable and where it is used."""
    env = {k: v for k, v in ENV.items() if k != "ACME_CONNEXUS_SECRET"}
    with pytest.raises(ConfigError) as exc:
        parse(yaml.safe_load(DESIGN_YAML), env=env)
    assert "ACME_CONNEXUS_SECRET" in str(exc.value)
    assert "tenants[acme].connexus.client_secret" in str(exc.value)


def test_secrets_do_not_print() -> None:
    """Secrets are SecretStr: neither repr nor str of the settings contains them."""
    settings = parse(yaml.safe_load(DESIGN_YAML), env=ENV)
    shown = repr(settings) + str(settings) + repr(settings.tenants[0].legacy)
    for secret in ENV.values():
        assert secret not in shown


# --- ${VAR} expansion ----------------------------------------------------------------------


def test_expand_set_variable() -> None:
    """`${VAR}` is replaced by its value, also inside a longer string and several times."""
    env = {"A": "one", "B": "two"}
    assert expand_env("${A}", env) == "one"
    assert expand_env("x-${A}-${B}-${A}", env) == "x-one-two-one"
    assert expand_env({"k": ["${B}", {"n": "${A}"}]}, env) == {"k": ["two", {"n": "one"}]}


def test_expand_set_variable_ignores_default() -> None:
    """`${VAR:-default}` uses the value of VAR when it is set and not empty."""
    assert expand_env("${A:-fallback}", {"A": "real"}) == "real"


def test_expand_unset_with_default() -> None:
    """`${VAR:-default}` gives the default when VAR is unset, `${VAR:-}` gives the empty string."""
    assert expand_env("${NOPE:-fallback}", {}) == "fallback"
    assert expand_env("${NOPE:-}", {}) == ""
    assert expand_env("${NOPE:-a b:c}", {}) == "a b:c"


def test_expand_empty_with_default() -> None:
    """`${VAR:-default}` gives the default when VAR is set but empty; `${VAR}` stays empty."""
    assert expand_env("${EMPTY:-fallback}", {"EMPTY": ""}) == "fallback"
    assert expand_env("${EMPTY}", {"EMPTY": ""}) == ""


def test_expand_unset_without_default_names_variable() -> None:
    """`${VAR}` with VAR unset is a ConfigError naming the variable."""
    with pytest.raises(ConfigError, match="MISSING_VAR_XYZ"):
        expand_env("${MISSING_VAR_XYZ}", {})


def test_expand_unset_names_key_in_config() -> None:
    """Through parse(), an unset variable's error also names the key it was used for."""
    cfg = _two_tenants()
    cfg["tenants"][1]["connexus"]["password"] = "${BETA_UPSTREAM_PW}"
    with pytest.raises(ConfigError) as exc:
        parse(cfg, env={})
    assert "BETA_UPSTREAM_PW" in str(exc.value)
    assert "tenants[beta].connexus.password" in str(exc.value)


def test_expand_is_not_recursive_and_leaves_other_text() -> None:
    """An expanded value is not expanded again; `$VAR`, `$$` and `${1X}` are left as they are."""
    assert expand_env("${A}", {"A": "${B}", "B": "no"}) == "${B}"
    assert expand_env("$A and $$ and ${1X}", {"A": "x"}) == "$A and $$ and ${1X}"


def test_expand_keeps_non_strings() -> None:
    """Numbers, booleans and None in the YAML tree pass through untouched."""
    assert expand_env({"a": 1, "b": True, "c": None, "d": 1.5}, {}) == {
        "a": 1,
        "b": True,
        "c": None,
        "d": 1.5,
    }


def test_expansion_after_yaml_parsing() -> None:
    """A secret of digits from the environment stays a string; numbers from env still validate."""
    text = """
server: {port: "${PORT:-9000}", shutdown_timeout_seconds: "${GRACE:-2.5}"}
webhook: {secret: "${HOOK}", register_on_start: "${REGISTER:-false}"}
tenants:
  - name: acme
    legacy:
      user_id: u
      password: ${PW}
    connexus: {client_id: c, client_secret: "${CS}"}
"""
    env = {"HOOK": "12345678", "PW": "00001234", "CS": "# not a comment"}
    settings = parse(yaml.safe_load(text), env=env)
    assert settings.server.port == 9000
    assert settings.server.shutdown_timeout_seconds == 2.5
    assert settings.webhook.register_on_start is False
    assert settings.webhook.secret.get_secret_value() == "12345678"
    legacy_pw = settings.tenants[0].legacy.password
    assert legacy_pw is not None
    assert legacy_pw.get_secret_value() == "00001234"
    client_secret = settings.tenants[0].connexus.client_secret
    assert client_secret is not None
    assert client_secret.get_secret_value() == "# not a comment"


def test_parse_reads_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit env, parse() and load() expand from os.environ."""
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    assert parse(yaml.safe_load(DESIGN_YAML)).tenants[0].name == "acme"
    assert load(EXAMPLE).webhook.secret.get_secret_value() == ENV["BC_PROXY_WEBHOOK_SECRET"]
    monkeypatch.delenv("ACME_LEGACY_PASSWORD")
    with pytest.raises(ConfigError, match="ACME_LEGACY_PASSWORD"):
        load(EXAMPLE)


# --- config/bc-proxy.example.yaml ----------------------------------------------------------


def test_example_loads_with_env() -> None:
    """The example validates with its env vars set and keeps the design values and extras."""
    settings = load(EXAMPLE, env=ENV)
    (acme,) = settings.tenants
    assert acme.push is not None
    assert acme.push.max_age_hours == 48
    assert settings.upstream.mo_query_interval_seconds == 300
    assert settings.log.level == "info"
    assert settings.webhook.secret.get_secret_value() == ENV["BC_PROXY_WEBHOOK_SECRET"]
    assert settings.status_map_for(acme) == {**DEFAULT_STATUS_MAP, 4: "INF", 16: "NRCV"}


def test_example_extends_design_section_2() -> None:
    """Every value of the design.md section 2 YAML is in the example, unchanged."""
    design = yaml.safe_load(DESIGN_YAML)
    example = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    for path, value in _leaves(design):
        assert _get(example, path) == value, path


def test_example_documents_every_setting() -> None:
    """Each key of the Settings model tree is in the example, at its nesting, with a comment."""
    keys = _keys(EXAMPLE.read_text(encoding="utf-8"))
    paths = _setting_paths()
    assert "tenants.push.max_age_hours" in paths  # the walk reaches nested, optional models
    missing = [p for p in paths if not _find(keys, p)]
    assert not missing, f"not in {EXAMPLE.name}: {missing}"
    undocumented = [p for p in paths if not any(k.documented for k in _find(keys, p))]
    assert not undocumented, f"no comment in {EXAMPLE.name}: {undocumented}"


def test_example_sets_every_setting_but_alternatives() -> None:
    """Every key is set (not just commented) in the example, except exclusive alternatives."""
    example = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    unset = [
        p
        for p in _setting_paths()
        if p not in ALTERNATIVES | OPT_IN and not _has_path(example, p)
    ]
    assert not unset, f"only commented out in {EXAMPLE.name}: {unset}"
    assert set(_setting_paths()) >= ALTERNATIVES


def test_key_finder_respects_nesting() -> None:
    """The documentation check tells a tenant's connexus.user_id from its legacy.user_id."""
    text = (
        "tenants:\n  - name: a\n    legacy:\n      user_id: u\n    connexus:\n      client_id: c\n"
    )
    keys = _keys(text)
    assert _find(keys, "tenants.legacy.user_id")
    assert not _find(keys, "tenants.connexus.user_id")
    assert not _find(keys, "user_id")
    assert _find(_keys(text + "      # user_id: x\n"), "tenants.connexus.user_id")


# --- config/test-minimal.yaml --------------------------------------------------------------


def test_minimal_config_defaults() -> None:
    """The minimal config has one tenant and every other setting at its documented default."""
    settings = load(MINIMAL, env={})
    (acme,) = settings.tenants
    assert acme.name == "acme"
    assert settings.server.host == "0.0.0.0"
    assert settings.server.port == 8080
    assert settings.server.max_body_bytes == 65536
    assert settings.server.metrics_port is None
    assert settings.upstream.base_url == "https://websms.co.nz/api/connexus"
    assert settings.store.url == "sqlite:///bc-proxy.db"
    assert settings.webhook.register_on_start is False
    assert acme.poll_wait_seconds == 30
    assert acme.push is None
    assert acme.senders == ()
    assert acme.default_from is None
    assert settings.log.requests is True
    assert settings.status_map_for(acme) == DEFAULT_STATUS_MAP


def test_minimal_config_is_minimal() -> None:
    """Removing any key from the minimal config makes it invalid."""
    data = yaml.safe_load(MINIMAL.read_text(encoding="utf-8"))
    for path, _ in _leaves(data):
        with pytest.raises(ConfigError):
            parse(_delete(data, path), env={})


# --- invalid configurations ----------------------------------------------------------------


def test_two_tenant_base_is_valid() -> None:
    """The base of the invalid cases below is itself valid (hash and password auth included)."""
    settings = parse(_two_tenants(), env={})
    assert [t.name for t in settings.tenants] == ["acme", "beta"]
    assert not settings.tenants[1].connexus.token_auth


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        pytest.param(_set("server.prot", 8080), ["server.prot"], id="unknown-server-key"),
        pytest.param(_set("tenant", []), ["tenant", "not permitted"], id="unknown-top-key"),
        pytest.param(_set("server.port", 70000), ["server.port"], id="port-range"),
        pytest.param(_set("server.metrics_port", -1), ["server.metrics_port"], id="metrics-port"),
        pytest.param(_set("server.max_body_bytes", 10), ["server.max_body_bytes"], id="body"),
        pytest.param(_set("upstream.base_url", "websms.co.nz"), ["upstream.base_url"], id="base"),
        pytest.param(
            _set("upstream.mo_query_interval_seconds", -5),
            ["upstream.mo_query_interval_seconds"],
            id="mo-interval",
        ),
        pytest.param(_set("store.url", "mysql://u@h/db"), ["store.url", "sqlite"], id="store"),
        pytest.param(_set("webhook.secret", "short"), ["webhook.secret", "8"], id="secret-short"),
        pytest.param(_drop("webhook"), ["webhook", "required"], id="no-webhook"),
        pytest.param(_set("tenants", []), ["tenants"], id="no-tenants"),
        pytest.param(_drop("tenants.1.legacy"), ["tenants[beta].legacy", "required"], id="legacy"),
        pytest.param(
            _drop("tenants.1.connexus"), ["tenants[beta].connexus", "required"], id="connexus"
        ),
        pytest.param(
            _beta(legacy={"user_id": "b", "password": "p", "password_hash": ARGON2_HASH}),
            ["tenants[beta].legacy", "password_hash"],
            id="both-passwords",
        ),
        pytest.param(
            _beta(legacy={"user_id": "b"}), ["tenants[beta].legacy", "password"], id="no-password"
        ),
        pytest.param(
            _beta(legacy={"user_id": "b", "password_hash": "$2b$12$abcdefghijklmnopqrstuv"}),
            ["tenants[beta].legacy", "argon2"],
            id="hash-not-argon2",
        ),
        pytest.param(
            _beta(legacy={"user_id": "", "password": "p"}),
            ["tenants[beta].legacy.user_id"],
            id="empty-user-id",
        ),
        pytest.param(
            _beta(connexus={"client_id": "cid"}),
            ["tenants[beta].connexus", "client_secret"],
            id="client-id-without-secret",
        ),
        pytest.param(
            _beta(connexus={"user_id": "ops@beta.example"}),
            ["tenants[beta].connexus", "password"],
            id="user-id-without-password",
        ),
        pytest.param(
            _beta(connexus={"client_id": "c", "client_secret": "s", "user_id": "u"}),
            ["tenants[beta].connexus"],
            id="token-and-password-auth",
        ),
        pytest.param(_beta(connexus={}), ["tenants[beta].connexus"], id="no-connexus-auth"),
        pytest.param(_beta(name="acme"), ["tenants", "duplicate", "acme"], id="duplicate-name"),
        pytest.param(
            _beta(legacy={"user_id": "acme-legacy", "password": "p"}),
            ["tenants", "acme-legacy", "acme", "beta"],
            id="duplicate-legacy-user",
        ),
        pytest.param(
            _beta(senders=["+2190"]), ["tenants", "2190", "acme", "beta"], id="shared-sender"
        ),
        pytest.param(
            _beta(status_map={2: "DELIVERED"}),
            ["tenants[beta].status_map", "DELIVERED"],
            id="tenant-status-map-value",
        ),
        pytest.param(
            _beta(status_map={"two": "NRCV"}), ["tenants[beta].status_map"], id="status-map-key"
        ),
        pytest.param(
            _set("status_map", {2: "DELIVERED"}), ["status_map", "DELIVERED"], id="status-map"
        ),
        pytest.param(
            _beta(poll_wait_seconds=-1), ["tenants[beta].poll_wait_seconds"], id="poll-negative"
        ),
        pytest.param(
            _beta(poll_wait_seconds=301), ["tenants[beta].poll_wait_seconds"], id="poll-too-long"
        ),
        pytest.param(_beta(name="be ta!"), ["name"], id="tenant-name-pattern"),
        pytest.param(_beta(sender=["1"]), ["tenants[beta].sender"], id="unknown-tenant-key"),
        pytest.param(
            _beta(push={"incoming_url": "https://x", "max_age_hours": 0}),
            ["tenants[beta].push.max_age_hours"],
            id="push-max-age",
        ),
        pytest.param(
            _beta(push={"timeout_seconds": 0}),
            ["tenants[beta].push.timeout_seconds"],
            id="push-timeout",
        ),
        pytest.param(_set("log.level", "verbose"), ["log.level"], id="log-level"),
        pytest.param(_set("log.format", "xml"), ["log.format"], id="log-format"),
        pytest.param(
            _set("server.workers", 2), ["server.workers", "postgresql"], id="workers-on-sqlite"
        ),
        pytest.param(_set("server.workers", 0), ["server.workers"], id="workers-zero"),
        pytest.param(
            _beta(legacy={"user_id": "b", "password": ""}),
            ["tenants[beta].legacy.password", "empty"],
            id="empty-legacy-password",
        ),
        pytest.param(
            _beta(connexus={"client_id": "c", "client_secret": ""}),
            ["tenants[beta].connexus.client_secret", "empty"],
            id="empty-connexus-secret",
        ),
        pytest.param(
            _beta(webhook_secret="test-webhook-secret-0123"),
            ["tenants[beta].webhook_secret", "webhook.secret"],
            id="tenant-webhook-secret-reused",
        ),
        pytest.param(
            _beta(webhook_secret="short"),
            ["tenants[beta].webhook_secret"],
            id="tenant-secret-short",
        ),
        pytest.param(
            _beta(inbound={"mode": "carrier-pigeon"}), ["tenants[beta].inbound.mode"], id="inbound"
        ),
        pytest.param(
            _set("upstream.unknown_retry_status", 200),
            ["upstream.unknown_retry_status"],
            id="unknown-retry-status",
        ),
        pytest.param(
            _set("console", {"user": "ops", "password_hash": "plain"}),
            ["console.password_hash"],
            id="console-hash",
        ),
        pytest.param(  # the default window (1 day) outlives sends kept half a day
            _set("store.retention_days", 0.5),
            ["tenants[", "idempotency_window_seconds", "store.retention_days", "sent again"],
            id="retention-shorter-than-window",
        ),
    ],
)
def test_invalid_config_names_key(mutate: Mutation, expected: list[str]) -> None:
    """An invalid configuration is a ConfigError whose message names the offending key."""
    cfg = _two_tenants()
    mutate(cfg)
    with pytest.raises(ConfigError) as exc:
        parse(cfg, env={})
    message = str(exc.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_retention_as_long_as_the_window_is_accepted() -> None:
    """Sends kept exactly as long as the longest idempotency window validate."""
    cfg = _two_tenants()
    cfg.setdefault("store", {})["retention_days"] = 0.5
    for tenant in cfg["tenants"]:
        tenant["idempotency_window_seconds"] = 43200
    assert parse(cfg, env={}).store.retention_days == 0.5


def test_workers_accepted_with_postgresql() -> None:
    """server.workers > 1 validates with a postgresql:// store, and per-tenant keys default."""
    cfg = _two_tenants()
    cfg["server"] = {"workers": 4}
    cfg["store"] = {"url": "postgresql://bc@127.0.0.1/bc"}
    settings = parse(cfg, env={})
    assert settings.server.workers == 4
    beta = settings.tenants[1]
    assert beta.opt_out is True
    assert beta.idempotency_window_seconds == 86400
    assert beta.inbound.mode == "webhook"
    assert "sms/balance" in beta.passthrough
    assert "configure" not in beta.passthrough


def test_tenant_error_uses_name_not_index() -> None:
    """A tenant's error says tenants[beta], not tenants[1] or tenants.1."""
    cfg = _two_tenants()
    cfg["tenants"][1]["poll_wait_seconds"] = -1
    with pytest.raises(ConfigError) as exc:
        parse(cfg, env={})
    assert "tenants[beta].poll_wait_seconds" in str(exc.value)
    assert "tenants[1]" not in str(exc.value)
    assert "tenants.1" not in str(exc.value)


def test_errors_do_not_echo_secrets() -> None:
    """A rejected secret value is not repeated in the error message."""
    cfg = _two_tenants()
    cfg["webhook"]["secret"] = "hunt2"
    cfg["tenants"][1]["legacy"] = {"user_id": "b", "password_hash": "plain-hunter2-pw"}
    with pytest.raises(ConfigError) as exc:
        parse(cfg, env={})
    assert "hunt2" not in str(exc.value)
    assert "hunter2" not in str(exc.value)
    assert "webhook.secret" in str(exc.value)
    assert "tenants[beta].legacy" in str(exc.value)


def test_not_a_mapping() -> None:
    """A YAML document that is not a mapping (empty file, a list) is a ConfigError."""
    data: object
    for data in (None, [], "server"):
        with pytest.raises(ConfigError, match="mapping"):
            parse(data, env={})


def test_load_unreadable_and_malformed(tmp_path: Path) -> None:
    """load() turns a missing file and broken YAML into ConfigErrors naming the file."""
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("server: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken\.yaml"):
        load(broken)


def test_senders_lose_plus_and_status_maps_layer() -> None:
    """Senders drop a leading +; status maps apply built-in, then global, then tenant entries."""
    cfg = _two_tenants()
    cfg["status_map"] = {2: "ERR", 32: "INF"}
    cfg["tenants"][1].update(senders=["+6421000"], status_map={32: "EXP"})
    settings = parse(cfg, env={})
    acme, beta = settings.tenants
    assert beta.senders == ("6421000",)
    assert settings.status_map_for(acme) == {**DEFAULT_STATUS_MAP, 2: "ERR", 32: "INF"}
    assert settings.status_map_for(beta) == {**DEFAULT_STATUS_MAP, 2: "ERR", 32: "EXP"}


def test_settings_are_frozen() -> None:
    """Settings are immutable once loaded."""
    settings = parse(_two_tenants(), env={})
    with pytest.raises(ValueError, match="frozen"):
        settings.server.port = 1  # type: ignore[misc]
