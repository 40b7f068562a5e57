"""HTTPS serving: `bc-proxy serve` with a self-signed certificate made in the test (openssl
CLI) takes a legacy send over https verified against that certificate; `check-config` refuses
unreadable files and a certificate and key that are not a pair."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import aiohttp
import pytest

from bc_proxy import cli
from tests.conftest import Connexus, config_dict, creds
from tests.served import Served, free_port, write_config

# The openssl CLI (Debian: package openssl, a dependency of ca-certificates) makes the
# certificates; the `cryptography` package is not a dependency. Without the CLI these tests
# fail rather than skip, so HTTPS is never silently untested.
OPENSSL = shutil.which("openssl") or "openssl"


def make_cert(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost and its key (PEM files)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "2", "-subj", "/CN=bc-proxy-test",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


async def test_legacy_send_over_https(tmp_path: Path, connexus: Connexus) -> None:
    """A legacy send over https (certificate verified) is 204 and reaches Connexus; a client
    that trusts nothing else refuses the connection."""
    cert, key = make_cert(tmp_path)
    port = free_port()
    cfg = config_dict(tmp_path, connexus.base_url, port=port)
    cfg["server"].update(tls_cert_file=str(cert), tls_key_file=str(key))
    cfg["upstream"]["mo_query_interval_seconds"] = 0
    config = write_config(tmp_path / "bc-proxy.yaml", cfg)
    trusted = ssl.create_default_context(cafile=str(cert))
    with (tmp_path / "gateway.log").open("w") as log:
        conn = aiohttp.TCPConnector(ssl=trusted)
        async with aiohttp.ClientSession(connector=conn) as https:
            served = Served(config, port, log)
            served.base = f"https://127.0.0.1:{port}"
            await served.start(https)
            try:
                params = creds(to="6421000300", body="over tls", messageId="tls-1")
                async with https.post(served.base + "/api/1/sms/out", data=params) as resp:
                    assert resp.status == 204
                assert [s.to for s in connexus.emu.sent] == ["6421000300"]
                async with aiohttp.ClientSession() as default:  # system CAs only
                    with pytest.raises(aiohttp.ClientConnectorCertificateError):
                        await default.get(served.base + "/healthz")
            finally:
                assert await served.stop() == 0


def check(tmp_path: Path, cert: str, key: str) -> int:
    """`bc-proxy check-config` of a configuration with these TLS files: the exit status."""
    cfg = config_dict(tmp_path, "http://127.0.0.1:9/api/connexus")
    cfg["server"].update(tls_cert_file=cert, tls_key_file=key)
    return cli.main(["check-config", "--config", str(write_config(tmp_path / "c.yaml", cfg))])


def test_check_config_tls_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config: a good pair is OK; a missing file, a non-PEM file and a key of another
    certificate each exit 2 naming the keys."""
    cert, key = make_cert(tmp_path, "a")
    _, other_key = make_cert(tmp_path, "b")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    assert check(tmp_path, str(cert), str(key)) == 0
    capsys.readouterr()
    for c, k in [
        (str(tmp_path / "missing.crt"), str(key)),
        (str(cert), str(tmp_path / "missing.key")),
        (str(garbage), str(key)),
        (str(cert), str(other_key)),
    ]:
        assert check(tmp_path, c, k) == 2
        err = capsys.readouterr().err
        assert "server.tls_cert_file/tls_key_file" in err
