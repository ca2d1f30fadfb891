"""
C{jobworker-pki} for real use (issue 14, item 7): validity in days for
every certificate, a CA name, signing a CSR made elsewhere (by C{openssl}),
refusing an unknown role, and files handed to the invoking user under sudo.
"""

from __future__ import annotations

import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support import BIN, need


def pki(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "jobworker-pki"), *args], capture_output=True, text=True, timeout=60, env=env)


def certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def lifetime(path: Path) -> timedelta:
    cert = certificate(path)
    return cert.not_valid_after_utc - cert.not_valid_before_utc


def test_days_for_every_certificate(tmp_path):
    assert pki("ca", str(tmp_path), "--days", "30").returncode == 0
    assert pki("server", str(tmp_path), "--hostname", "localhost", "--days", "7").returncode == 0
    assert pki("client", str(tmp_path), "--cn", "carol", "--role", "viewer", "--days", "2").returncode == 0
    assert lifetime(tmp_path / "ca.pem") == timedelta(days=30)
    assert lifetime(tmp_path / "server.pem") == timedelta(days=7)
    assert lifetime(tmp_path / "carol.pem") == timedelta(days=2)
    dev = tmp_path / "dev"
    assert pki("dev", str(dev), "--days", "5").returncode == 0
    for name in ("ca", "server", "admin", "alice", "bob", "viewer"):
        assert lifetime(dev / f"{name}.pem") == timedelta(days=5), name


@pytest.mark.parametrize("days", ["0", "-1", "many", "40000"])
def test_bad_days_are_refused(days, tmp_path):
    result = pki("ca", str(tmp_path), "--days", days)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert not (tmp_path / "ca.pem").exists()


def test_ca_name(tmp_path):
    assert pki("ca", str(tmp_path), "--ca-name", "Example Corp jobworker CA").returncode == 0
    subject = certificate(tmp_path / "ca.pem").subject
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Example Corp jobworker CA"
    assert pki("dev", str(tmp_path / "dev"), "--ca-name", "lab CA").returncode == 0
    assert certificate(tmp_path / "dev" / "ca.pem").subject.rfc4514_string() == "CN=lab CA"


@pytest.mark.parametrize("command", [["client", "--cn", "mallory"], ["sign", "request.csr"]])
def test_an_unknown_role_is_refused(command, tmp_path):
    assert pki("ca", str(tmp_path)).returncode == 0
    result = pki(command[0], str(tmp_path), *command[1:], "--role", "superuser")
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and "invalid choice: 'superuser'" in result.stderr, result.stderr
    assert not (tmp_path / "mallory.pem").exists()


def openssl_csr(directory: Path, subject: str) -> tuple[Path, Path]:
    need(shutil.which("openssl") is not None, "needs the openssl command")
    key, csr = directory / "me.key", directory / "me.csr"
    subprocess.run(
        ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(key), "-out", str(csr), "-subj", subject],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
    )
    return key, csr


def test_sign_a_server_csr(tmp_path):
    assert pki("ca", str(tmp_path)).returncode == 0
    _, csr = openssl_csr(tmp_path, "/CN=ignored.example")
    result = pki("sign", str(tmp_path), str(csr), "--hostname", "node7.example", "--hostname", "10.1.2.3",
                 "--cn", "node7.example")
    assert result.returncode == 0, result.stderr
    cert = certificate(tmp_path / "node7.example.pem")
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["node7.example"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_sign_refuses_what_is_not_a_csr(tmp_path):
    assert pki("ca", str(tmp_path)).returncode == 0
    result = pki("sign", str(tmp_path), str(tmp_path / "ca.pem"), "--role", "user")
    assert result.returncode == 1 and "holds no PEM certificate signing request" in result.stderr
