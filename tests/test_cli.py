"""The real console entry point (`python -m bc_proxy`) in subprocesses: check-config,
hash-password, emulator and serve, each bounded by timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
import yaml
from argon2 import PasswordHasher
from argon2.exceptions import VerifyMismatchError

from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    LEGACY_PASSWORD,
    LEGACY_USER,
    Connexus,
    GatewayFactory,
    config_dict,
)
from tests.served import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "bc-proxy.example.yaml"
MINIMAL = ROOT / "config" / "test-minimal.yaml"
EXAMPLE_ENV = {
    "BC_PROXY_WEBHOOK_SECRET": "whsec-0123456789",
    "ACME_LEGACY_PASSWORD": "acme-legacy-pass",
    "ACME_CONNEXUS_SECRET": "csk_acme_secret",
}
RUN_TIMEOUT = 60
START_TIMEOUT = 10.0


def _env(**extra: str) -> dict[str, str]:
    """The test's environment without anything that could configure bc-proxy, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "BC_PROXY_CONFIG" and k not in EXAMPLE_ENV}
    env.update(extra)
    return env


def _run(
    *args: str, env: Mapping[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m bc_proxy ARGS` to completion (bounded) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "bc_proxy", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=dict(env) if env is not None else _env(),
        cwd=ROOT,
        check=False,
    )


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _minimal() -> dict[str, Any]:
    data = yaml.safe_load(MINIMAL.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _request(
    url: str, data: Mapping[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    """(status, body) of a GET, or a form POST when `data` is given; HTTP errors included."""
    body = urlencode(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_until_answers(
    proc: subprocess.Popen[bytes], url: str, data: Mapping[str, str] | None = None
) -> tuple[int, bytes]:
    """Poll `url` until the process answers it (max START_TIMEOUT s); fail if it exits first."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        assert proc.poll() is None, f"process exited early with {proc.returncode}"
        try:
            return _request(url, data, timeout=2.0)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


Spawn = Callable[..., "subprocess.Popen[bytes]"]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start `python -m bc_proxy ARGS` in the background; whatever is left is killed after."""
    procs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as files:

        def start(*args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
            n = len(procs)
            proc = subprocess.Popen(
                [sys.executable, "-m", "bc_proxy", *args],
                stdin=subprocess.DEVNULL,
                stdout=files.enter_context((tmp_path / f"proc{n}.out").open("wb")),
                stderr=files.enter_context((tmp_path / f"proc{n}.err").open("wb")),
                env=dict(env) if env is not None else _env(),
                cwd=ROOT,
            )
            procs.append(proc)
            return proc

        yield start
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


# --- check-config --------------------------------------------------------------------------


def test_check_config_valid_minimal() -> None:
    """check-config on the minimal config exits 0 and prints OK with the tenant."""
    res = _run("check-config", "--config", str(MINIMAL))
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout
    assert "acme" in res.stdout


def test_check_config_example_with_env(tmp_path: Path) -> None:
    """The documented example passes check-config once its env vars are set and its store
    directory (the container's volume, /var/lib/bc-proxy) exists: here a temporary one."""
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    data["store"]["url"] = f"sqlite:///{tmp_path}/bc-proxy.db"
    res = _run(
        "check-config", "--config", str(_write(tmp_path / "ex.yaml", data)), env=_env(**EXAMPLE_ENV)
    )
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout


def test_check_config_unknown_key(tmp_path: Path) -> None:
    """An unknown key fails check-config, the message naming the key, and prints no OK."""
    data = _minimal()
    data["server"] = {"prot": 8080}
    res = _run("check-config", "--config", str(_write(tmp_path / "bad.yaml", data)))
    assert res.returncode != 0
    assert "server.prot" in res.stderr
    assert "OK" not in res.stdout


def test_check_config_tenant_error_names_tenant(tmp_path: Path) -> None:
    """A tenant's invalid value fails check-config with the tenant name and key in the message."""
    data = _minimal()
    data["tenants"][0]["poll_wait_seconds"] = -1
    res = _run("check-config", "--config", str(_write(tmp_path / "bad.yaml", data)))
    assert res.returncode != 0
    assert "tenants[acme].poll_wait_seconds" in res.stderr


def test_check_config_missing_env_var() -> None:
    """An unset `${VAR}` fails, naming the variable and the key, and shows no secret."""
    env = _env(**{k: v for k, v in EXAMPLE_ENV.items() if k != "ACME_CONNEXUS_SECRET"})
    res = _run("check-config", "--config", str(EXAMPLE), env=env)
    assert res.returncode != 0
    assert "ACME_CONNEXUS_SECRET" in res.stderr
    assert "tenants[acme].connexus.client_secret" in res.stderr
    assert EXAMPLE_ENV["ACME_LEGACY_PASSWORD"] not in res.stderr + res.stdout


def test_check_config_missing_file(tmp_path: Path) -> None:
    """A configuration file that does not exist fails with its path in the message."""
    res = _run("check-config", "--config", str(tmp_path / "absent.yaml"))
    assert res.returncode != 0
    assert "absent.yaml" in res.stderr


def test_check_config_from_env_var(tmp_path: Path) -> None:
    """BC_PROXY_CONFIG names the file when --config is absent (valid and invalid alike)."""
    ok = _run("check-config", env=_env(BC_PROXY_CONFIG=str(MINIMAL)))
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    data = _minimal()
    data["webhook"]["secret"] = "short"
    bad_file = _write(tmp_path / "bad.yaml", data)
    bad = _run("check-config", env=_env(BC_PROXY_CONFIG=str(bad_file)))
    assert bad.returncode != 0
    assert "webhook.secret" in bad.stderr


def test_check_config_flag_beats_env_var(tmp_path: Path) -> None:
    """--config wins over BC_PROXY_CONFIG."""
    data = _minimal()
    data["server"] = {"prot": 1}
    bad_file = _write(tmp_path / "bad.yaml", data)
    res = _run("check-config", "--config", str(MINIMAL), env=_env(BC_PROXY_CONFIG=str(bad_file)))
    assert res.returncode == 0, res.stderr


def test_check_config_without_any_config() -> None:
    """Neither --config nor BC_PROXY_CONFIG: non-zero, and the message says how to give one."""
    res = _run("check-config")
    assert res.returncode != 0
    assert "--config" in res.stderr
    assert "BC_PROXY_CONFIG" in res.stderr


# --- hash-password -------------------------------------------------------------------------


def _hash_from_output(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1, res.stdout
    assert lines[0].startswith("$argon2id$")
    return lines[0]


def test_hash_password_argument() -> None:
    """hash-password PASSWORD prints one argon2id hash that verifies that password only."""
    hashed = _hash_from_output(_run("hash-password", "correct horse"))
    assert PasswordHasher().verify(hashed, "correct horse")
    with pytest.raises(VerifyMismatchError):
        PasswordHasher().verify(hashed, "correct horsE")


def test_hash_password_stdin() -> None:
    """Without an argument the password is the first stdin line (newline stripped, spaces kept)."""
    hashed = _hash_from_output(_run("hash-password", stdin=" s3cret pass \nignored\n"))
    assert PasswordHasher().verify(hashed, " s3cret pass ")
    with pytest.raises(VerifyMismatchError):
        PasswordHasher().verify(hashed, " s3cret pass \n")


def test_hash_password_is_salted() -> None:
    """Two hashes of the same password differ (random salt)."""
    first = _hash_from_output(_run("hash-password", "same"))
    second = _hash_from_output(_run("hash-password", "same"))
    assert first != second


def test_hash_password_empty_stdin() -> None:
    """An empty password on stdin is refused with a non-zero exit and no hash."""
    res = _run("hash-password", stdin="\n")
    assert res.returncode != 0
    assert "$argon2" not in res.stdout


@pytest.fixture
def legacy_hash() -> str:
    """LEGACY_PASSWORD hashed by the real `bc-proxy hash-password` (stdin)."""
    return _hash_from_output(_run("hash-password", stdin=LEGACY_PASSWORD + "\n"))


async def test_hashed_password_authenticates_legacy_send(
    tmp_path: Path, connexus: Connexus, gateway: GatewayFactory, legacy_hash: str
) -> None:
    """A config with the CLI's hash as password_hash passes check-config and authenticates."""
    cfg = config_dict(tmp_path, connexus.base_url)
    cfg["tenants"][0]["legacy"] = {"user_id": LEGACY_USER, "password_hash": legacy_hash}
    path = _write(tmp_path / "hashed.yaml", cfg)
    check = _run("check-config", "--config", str(path))
    assert check.returncode == 0, check.stderr
    client = await gateway(cfg)
    params = {"to": "6421000000", "body": "hi", "userId": LEGACY_USER}
    resp = await client.get("/api/1/sms/test", params={**params, "password": LEGACY_PASSWORD})
    assert resp.status == 204
    again = await client.post("/api/1/sms/test", data={**params, "password": LEGACY_PASSWORD})
    assert again.status == 204
    wrong = await client.get("/api/1/sms/test", params={**params, "password": "wrong"})
    assert wrong.status == 401
    hash_as_password = await client.get(
        "/api/1/sms/test", params={**params, "password": legacy_hash}
    )
    assert hash_as_password.status == 401
    assert connexus.emu.sms_out_requests() == []


# --- emulator ------------------------------------------------------------------------------


def test_emulator_serves_auth_token(spawn: Spawn) -> None:
    """`bc-proxy emulator --port N` answers auth/token: a bearer token, or 401 for wrong secrets."""
    port = _free_port()
    proc = spawn("emulator", "--host", "127.0.0.1", "--port", str(port))
    url = f"http://127.0.0.1:{port}/api/connexus/auth/token"
    status, body = _wait_until_answers(
        proc, url, {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    )
    assert status == 200, body
    token = json.loads(body)
    assert token["access_token"].startswith("wst_")
    assert token["token_type"] == "Bearer"
    assert token["expires_in"] > 0
    status, _ = _request(url, {"client_id": CLIENT_ID, "client_secret": "nope"})
    assert status == 401
    proc.terminate()
    proc.wait(timeout=10)


# --- serve ---------------------------------------------------------------------------------


def test_serve_healthz_and_sigterm(tmp_path: Path, spawn: Spawn) -> None:
    """serve answers /healthz and legacy sends; SIGTERM ends a long-poll, exits 0 in time."""
    port = _free_port()
    grace = 2.0
    data = _minimal()
    data["server"] = {"host": "127.0.0.1", "port": port, "shutdown_timeout_seconds": grace}
    data["upstream"] = {"base_url": f"http://127.0.0.1:{_free_port()}/api/connexus"}
    data["store"] = {"url": f"sqlite:///{tmp_path / 'serve.db'}"}
    data["tenants"][0]["poll_wait_seconds"] = 60
    data["log"] = {"format": "json"}
    config = _write(tmp_path / "serve.yaml", data)
    proc = spawn("serve", "--config", str(config))
    base = f"http://127.0.0.1:{port}"

    status, body = _wait_until_answers(proc, f"{base}/healthz")
    assert status == 200
    assert json.loads(body)["status"] == "alive"
    creds = {"userId": LEGACY_USER, "password": LEGACY_PASSWORD}
    assert _request(f"{base}/api/1/sms/test", {**creds, "to": "6421000000", "body": "x"})[0] == 204
    assert _request(f"{base}/api/1/sms/queue", creds) == (200, b"inCount=0&statusCount=0")

    with ThreadPoolExecutor(max_workers=1) as pool:
        poll = pool.submit(_request, f"{base}/api/1/sms/in", creds, 30.0)
        time.sleep(1.0)  # let the long-poll reach the server and start waiting
        assert not poll.done()
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=grace + 2)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve still running {grace + 2} s after SIGTERM")
        took = time.monotonic() - sent
        assert poll.result(timeout=5) == (204, b"")
    assert code == 0, (tmp_path / "proc0.err").read_text(encoding="utf-8")
    assert took <= grace + 2


def test_serve_invalid_config_exits_nonzero(tmp_path: Path) -> None:
    """serve with an invalid config exits non-zero at once with the offending key."""
    data = _minimal()
    data["store"] = {"url": "mysql://db/x"}
    res = _run("serve", "--config", str(_write(tmp_path / "bad.yaml", data)))
    assert res.returncode != 0
    assert "store.url" in res.stderr


# --- check-config: every problem at once, and what serve could not use ---------------------


def test_check_config_names_three_mistakes_and_nothing_else(tmp_path: Path) -> None:
    """Three independent mistakes give exactly three error lines, each naming its key, and no
    follow-on noise such as "tenants: Tuple should have at least 1 item"."""
    data = _minimal()
    data["tenants"][0]["poll_wait_seconds"] = -1
    data["tenants"][0]["push"] = {"incoming_url": "ftp://legacy.example/in"}
    data["store"] = {"url": f"sqlite:///{tmp_path}/missing-dir/bc-proxy.db"}
    res = _run("check-config", "--config", str(_write(tmp_path / "bad.yaml", data)))
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 3, res.stderr
    assert "tenants[acme].poll_wait_seconds" in res.stderr
    assert "tenants[acme].push.incoming_url" in res.stderr
    assert "store.url" in res.stderr
    assert "Tuple" not in res.stderr
    assert "OK" not in res.stdout


def test_check_config_names_every_missing_variable(tmp_path: Path) -> None:
    """Every unset ${VAR} is named with its key in one run, and no empty-value noise follows."""
    data = _minimal()
    data["webhook"]["secret"] = "${BC_TEST_UNSET_ONE}"
    data["tenants"][0]["legacy"]["password"] = "${BC_TEST_UNSET_TWO}"
    res = _run("check-config", "--config", str(_write(tmp_path / "env.yaml", data)))
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2, res.stderr
    assert "webhook.secret: environment variable BC_TEST_UNSET_ONE" in res.stderr
    assert "tenants[acme].legacy.password: environment variable BC_TEST_UNSET_TWO" in res.stderr


def test_check_config_accepts_log_level_in_any_case(tmp_path: Path) -> None:
    """log.level INFO, Warning and debug are all accepted."""
    for level in ("INFO", "Warning", "debug"):
        data = _minimal()
        data["log"] = {"level": level}
        res = _run("check-config", "--config", str(_write(tmp_path / "lvl.yaml", data)))
        assert res.returncode == 0, res.stderr


def test_version_flag() -> None:
    """`bc-proxy --version` prints the package version and exits 0."""
    from bc_proxy import __version__

    res = _run("--version")
    assert res.returncode == 0
    assert res.stdout.strip() == f"bc-proxy {__version__}"


def test_serve_on_a_busy_port_says_so_in_one_line(tmp_path: Path) -> None:
    """serve on a port another socket holds exits non-zero with one error line, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        data = _minimal()
        data["server"] = {"host": "127.0.0.1", "port": taken.getsockname()[1]}
        data["store"] = {"url": f"sqlite:///{tmp_path}/bc-proxy.db"}
        data["log"] = {"level": "error"}
        res = _run("serve", "--config", str(_write(tmp_path / "busy.yaml", data)))
    assert res.returncode != 0
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    assert "Traceback" not in res.stderr


async def test_demo_runs_the_readme_send_and_polls() -> None:
    """`bc-proxy demo` (the README's first command) starts; the send it prints answers 204,
    and its delivery report and reply then come back through the legacy poll calls."""
    port, emu_port = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bc_proxy",
        "demo",
        "--port",
        str(port),
        "--emulator-port",
        str(emu_port),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/api/1/sms"
    auth = {"userId": "demo", "password": "demo-password"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with asyncio.timeout(20):
                while True:
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                            if r.status == 200:
                                break
                    await asyncio.sleep(0.1)
            form = {
                **auth,
                "to": "6421000001",
                "body": "Hello from bc-proxy",
                "messageId": "demo-1",
            }
            async with http.post(base + "/out", data=form) as r:
                assert r.status == 204
            got: dict[str, str] = {}
            async with asyncio.timeout(10):
                for kind in ("status", "in"):
                    while kind not in got:
                        async with http.get(f"{base}/{kind}", params=auth) as r:
                            if r.status == 200:
                                got[kind] = await r.text()
                        await asyncio.sleep(0.05)
            assert "inReplyToId=demo-1" in got["status"]
            assert "from=6421000001" in got["in"]
    finally:
        proc.terminate()
        async with asyncio.timeout(15):
            await proc.wait()
