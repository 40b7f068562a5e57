"""Reading a configuration file: `${VAR}` expansion, validation into `config.Settings` with
every problem reported at once (each with its key), and what `serve` could not use although
it validates (store directory, TLS files). Split from config.py, which re-exports it.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from bc_proxy.config import Settings
from bc_proxy.errors import ConfigError

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def _expand(value: Any, env: Mapping[str, str], where: str, missing: list[tuple[str, str]]) -> Any:
    """expand_env's walk: unset variables are recorded as (key, name) and expand to ''."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            got = env.get(name)
            if got is None or (got == "" and default is not None):
                if default is None:
                    missing.append((where, name))
                    return ""
                return default
            return got

        return _ENV_RE.sub(sub, value)
    if isinstance(value, dict):
        return {
            k: _expand(v, env, f"{where}.{k}" if where else str(k), missing)
            for k, v in value.items()
        }
    if isinstance(value, list):
        out = []
        for i, v in enumerate(value):
            name = v.get("name") if isinstance(v, dict) else None
            out.append(_expand(v, env, f"{where}[{name if name else i}]", missing))
        return out
    return value


def _missing_lines(missing: list[tuple[str, str]]) -> list[str]:
    return [
        f"{where}: environment variable {name} is not set"
        if where
        else f"environment variable {name} is not set"
        for where, name in missing
    ]


def expand_env(value: Any, env: Mapping[str, str] | None = None) -> Any:
    """Expand `${VAR}` and `${VAR:-default}` in every string of a parsed YAML tree; every
    unset variable without a default is named in one ConfigError."""
    missing: list[tuple[str, str]] = []
    out = _expand(value, os.environ if env is None else env, "", missing)
    if missing:
        raise ConfigError("\n".join(_missing_lines(missing)))
    return out


def _location(loc: tuple[int | str, ...], data: Any) -> str:
    """Render a pydantic error location with tenant names instead of list indexes."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int) and isinstance(node, list) and item < len(node):
            node = node[item]
            name = node.get("name") if isinstance(node, dict) else None
            parts.append(f"[{name}]" if name else f"[{item}]")
            continue
        parts.append(("." if parts else "") + str(item))
        node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts)


def parse(data: Any, env: Mapping[str, str] | None = None) -> Settings:
    """Validate an already-parsed YAML tree; raises one ConfigError naming every problem with
    its key, one per line (unset variables included; a key whose variable is unset is not
    reported a second time for being empty)."""
    if not isinstance(data, dict):
        raise ConfigError("the configuration must be a YAML mapping")
    missing: list[tuple[str, str]] = []
    expanded = _expand(data, os.environ if env is None else env, "", missing)
    lines = _missing_lines(missing)
    unset = {where for where, _ in missing}
    try:
        settings = Settings.model_validate(expanded)
    except ValidationError as exc:
        for err in exc.errors():
            where = _location(tuple(err["loc"]), expanded) or "(top level)"
            if any(where == u or where.startswith(u + ".") for u in unset):
                continue
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {msg}")
        raise ConfigError("\n".join(lines)) from None
    if lines:
        raise ConfigError("\n".join(lines))
    return settings


def usability_problems(settings: Settings) -> list[str]:
    """What `serve` could not use although it validates: each a line naming its key."""
    out = _store_problems(settings.store.url)
    from bc_proxy import tls  # tls needs this module's models

    try:
        tls.server_context(settings.server)  # readable, PEM, and a matching pair
    except ConfigError as exc:
        out.append(str(exc))
    if settings.server.metrics_port is not None and (
        settings.server.metrics_port == settings.server.port != 0
    ):
        out.append("server.metrics_port: the same as server.port")
    return out


def _store_problems(url: str) -> list[str]:
    """A SQLite store whose directory is missing or not writable (serve could not open it)."""
    out: list[str] = []
    if url.startswith("sqlite:///") and ":memory:" not in url:
        path = Path(url.removeprefix("sqlite:///").partition("?")[0])
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            out.append(f"store.url: directory {folder} does not exist")
        elif not _writable(folder):
            out.append(f"store.url: directory {folder} is not writable")
        elif path.exists() and not os.access(path, os.R_OK | os.W_OK):
            out.append(f"store.url: {path} is not readable and writable")
        elif path.exists():
            from bc_proxy.store.sqlite.helpers import moved_problem  # the store needs config

            if (problem := moved_problem(str(path))) is not None:
                out.append(f"store.url: {problem}")
    return out


def _writable(folder: Path) -> bool:
    """Try it: permission bits say nothing for root, nor about a read-only mount."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def load_usable(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    """`load`, then refuse what `serve` could not use; every problem in one ConfigError."""
    try:
        settings = load(path, env)
    except ConfigError as exc:
        # The models refused something: still name an unusable store directory in the same
        # report, so one check-config run shows every problem.
        extra = _store_problems(_raw_store_url(path, env))
        if extra and not any(line.startswith("store.url") for line in str(exc).splitlines()):
            raise ConfigError("\n".join([str(exc), *extra])) from None
        raise
    problems = usability_problems(settings)
    if problems:
        raise ConfigError("\n".join(problems))
    return settings


def _raw_store_url(path: str | Path, env: Mapping[str, str] | None) -> str:
    """store.url of a file the models refused, expanded where possible ('' when unknown)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        url = data["store"]["url"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return ""
    if not isinstance(url, str):
        return ""
    expanded = _expand(url, os.environ if env is None else env, "store.url", [])
    return expanded if isinstance(expanded, str) else ""


def load(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read, expand and validate a YAML configuration file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    return parse(data, env)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The parser's problem and where it is, without the lines it quotes: the line of a
    rotated password with a typo (a quote left open) would go into the logs of a refused
    reload in clear, as the scrubber only learns the secrets of a file it accepted."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return type(exc).__name__
    parts = []
    for text, mark in ((exc.context, exc.context_mark), (exc.problem, exc.problem_mark)):
        if text:
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            parts.append(f"{text}{where}")
    return "; ".join(parts) or type(exc).__name__
