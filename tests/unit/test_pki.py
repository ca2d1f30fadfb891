"""
Tests for L{jobworker.pki}: what the certificates say, where the files go
and who may read them, and the C{jobworker-pki} command.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobworker.pki import (
    CredentialError,
    main,
    make_ca,
    make_client_cert,
    make_dev_pki,
    make_server_cert,
    read_credentials,
)

DEV_FILES = {
    f"{name}.{suffix}"
    for name in ("ca", "server", "admin", "alice", "bob", "viewer")
    for suffix in ("pem", "key")
}


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def names(certificate: x509.Certificate, oid: x509.ObjectIdentifier) -> list[str | bytes]:
    return [attribute.value for attribute in certificate.subject.get_attributes_for_oid(oid)]


def extension(certificate: x509.Certificate, kind: type) -> x509.Extension:
    return certificate.extensions.get_extension_for_class(kind)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("dev") / "certs"
    make_dev_pki(directory)
    return directory


@pytest.fixture
def ca(tmp_path: Path) -> tuple[Path, Path]:
    return make_ca(tmp_path)


# make_dev_pki


def test_dev_pki_writes_exactly_its_files(dev: Path) -> None:
    assert {path.name for path in dev.iterdir()} == DEV_FILES


def test_dev_pki_keys_readable_by_owner_only(dev: Path) -> None:
    for path in dev.glob("*.key"):
        assert mode(path) == 0o600, path
    for path in dev.glob("*.pem"):
        assert mode(path) & 0o077 != 0o077 and mode(path) & 0o400, path


def test_dev_ca(dev: Path) -> None:
    ca = load(dev / "ca.pem")
    assert names(ca, NameOID.COMMON_NAME) == ["jobworker dev CA"]
    assert ca.issuer == ca.subject
    ca.verify_directly_issued_by(ca)
    constraints = extension(ca, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = extension(ca, x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature


@pytest.mark.parametrize(
    "name, role",
    [("admin", "admin"), ("alice", "user"), ("bob", "user"), ("viewer", "viewer")],
)
def test_dev_client(dev: Path, name: str, role: str) -> None:
    certificate = load(dev / f"{name}.pem")
    certificate.verify_directly_issued_by(load(dev / "ca.pem"))
    assert names(certificate, NameOID.COMMON_NAME) == [name]
    assert names(certificate, NameOID.ORGANIZATIONAL_UNIT_NAME) == [role]
    assert list(extension(certificate, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert not extension(certificate, x509.BasicConstraints).value.ca


def test_dev_server(dev: Path) -> None:
    certificate = load(dev / "server.pem")
    certificate.verify_directly_issued_by(load(dev / "ca.pem"))
    assert names(certificate, NameOID.COMMON_NAME) == ["localhost"]
    assert names(certificate, NameOID.ORGANIZATIONAL_UNIT_NAME) == []
    alternative = extension(certificate, x509.SubjectAlternativeName).value
    assert alternative.get_values_for_type(x509.DNSName) == ["localhost"]
    assert alternative.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert list(extension(certificate, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    usage = extension(certificate, x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign


@pytest.mark.parametrize("name", ["ca", "server", "admin", "alice", "bob", "viewer"])
def test_dev_keys_are_p256_and_signatures_sha256(dev: Path, name: str) -> None:
    chain, key = read_credentials(dev / f"{name}.pem", dev / f"{name}.key")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert isinstance(chain[0].signature_hash_algorithm, hashes.SHA256)


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {
        path.name: (path.read_bytes(), path.stat().st_mtime_ns)
        for path in directory.iterdir()
    }


def test_dev_pki_is_left_alone_once_made(tmp_path: Path) -> None:
    make_dev_pki(tmp_path)
    before = snapshot(tmp_path)
    make_dev_pki(tmp_path)
    assert snapshot(tmp_path) == before


def test_dev_pki_force_makes_a_new_one(tmp_path: Path) -> None:
    make_dev_pki(tmp_path)
    old_ca = (tmp_path / "ca.pem").read_bytes()
    make_dev_pki(tmp_path, force=True)
    assert (tmp_path / "ca.pem").read_bytes() != old_ca
    assert {path.name for path in tmp_path.iterdir()} == DEV_FILES
    load(tmp_path / "alice.pem").verify_directly_issued_by(load(tmp_path / "ca.pem"))


def test_dev_pki_trusts_an_existing_ca_file(tmp_path: Path) -> None:
    """
    The check is only for C{ca.pem}: a directory holding one is taken as
    made, and nothing is added to it.
    """
    (tmp_path / "ca.pem").write_text("someone's CA\n")
    make_dev_pki(tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["ca.pem"]


# The make_* functions


def test_existing_key_file_is_made_private(tmp_path: Path) -> None:
    """
    A key written over an existing, world-readable file ends up 0600 too,
    not only a newly created one.
    """
    (tmp_path / "ca.key").write_text("old")
    os.chmod(tmp_path / "ca.key", 0o644)
    _, key_path = make_ca(tmp_path)
    assert mode(key_path) == 0o600
    serialization.load_pem_private_key(key_path.read_bytes(), password=None)


def test_server_names_of_both_kinds(tmp_path: Path, ca: tuple[Path, Path]) -> None:
    cert_path, key_path = make_server_cert(
        tmp_path, *ca, name="web", hostnames=("10.0.0.5", "jobs.example.org", "fd00::5")
    )
    assert (cert_path.name, key_path.name) == ("web.pem", "web.key")
    certificate = load(cert_path)
    assert names(certificate, NameOID.COMMON_NAME) == ["10.0.0.5"]
    alternative = extension(certificate, x509.SubjectAlternativeName).value
    assert alternative.get_values_for_type(x509.DNSName) == ["jobs.example.org"]
    assert alternative.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("fd00::5"),
    ]


def test_server_needs_a_hostname(tmp_path: Path, ca: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match="at least one hostname"):
        make_server_cert(tmp_path, *ca, hostnames=())


def test_client_without_role(tmp_path: Path, ca: tuple[Path, Path]) -> None:
    cert_path, _ = make_client_cert(tmp_path, *ca, "carol", None)
    assert cert_path.name == "carol.pem"
    certificate = load(cert_path)
    assert names(certificate, NameOID.COMMON_NAME) == ["carol"]
    assert names(certificate, NameOID.ORGANIZATIONAL_UNIT_NAME) == []


def test_client_validity_and_key_usage_for_tests(tmp_path: Path, ca: tuple[Path, Path]) -> None:
    start = datetime(2020, 1, 1, tzinfo=UTC)
    end = datetime(2020, 2, 1, tzinfo=UTC)
    expired, _ = make_client_cert(
        tmp_path, *ca, "carol", "user", name="expired",
        not_valid_before=start, not_valid_after=end,
    )  # fmt: skip
    assert (load(expired).not_valid_before_utc, load(expired).not_valid_after_utc) == (start, end)

    short, _ = make_client_cert(tmp_path, *ca, "carol", "user", name="short", days=2)
    lifetime = load(short).not_valid_after_utc - load(short).not_valid_before_utc
    assert lifetime == timedelta(days=2)

    none, _ = make_client_cert(tmp_path, *ca, "carol", "user", name="none", extended_key_usage=())
    with pytest.raises(x509.ExtensionNotFound):
        extension(load(none), x509.ExtendedKeyUsage)

    server, _ = make_client_cert(
        tmp_path, *ca, "carol", "user", name="server", extended_key_usage=("serverAuth",)
    )
    assert list(extension(load(server), x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    with pytest.raises(ValueError, match="unknown extended key usage 'emailProtection'"):
        make_client_cert(tmp_path, *ca, "carol", "user", extended_key_usage=("emailProtection",))


@pytest.mark.parametrize("name", ["../evil", "sub/evil", "..", ""])
def test_file_name_cannot_leave_the_directory(tmp_path: Path, name: str) -> None:
    directory = tmp_path / "certs"
    ca = make_ca(directory)
    with pytest.raises(ValueError, match="cannot be used as a file name"):
        make_client_cert(directory, *ca, "carol", "user", name=name)
    if name:
        # The CN is the default file name; it is checked all the same.
        with pytest.raises(ValueError, match="cannot be used as a file name"):
            make_client_cert(directory, *ca, name, "user")
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["ca.key", "ca.pem", "certs"]


def test_signing_needs_the_ca_key(tmp_path: Path) -> None:
    first = make_ca(tmp_path / "first")
    second = make_ca(tmp_path / "second")
    with pytest.raises(CredentialError, match="is not the private key of"):
        make_client_cert(tmp_path, first[0], second[1], "carol", "user")


# read_credentials


def test_read_credentials_names_the_file(tmp_path: Path, ca: tuple[Path, Path]) -> None:
    cert_path, key_path = ca
    with pytest.raises(CredentialError, match=f"cannot read {tmp_path}/absent.key"):
        read_credentials(cert_path, tmp_path / "absent.key")
    with pytest.raises(CredentialError, match=f"{key_path} holds no PEM certificate"):
        read_credentials(key_path, key_path)
    with pytest.raises(CredentialError, match=f"{cert_path} holds no unencrypted PEM"):
        read_credentials(cert_path, cert_path)
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(CredentialError, match="encrypted.key holds no unencrypted"):
        read_credentials(cert_path, encrypted)


def test_read_credentials_keeps_the_chain_in_order(tmp_path: Path, ca: tuple[Path, Path]) -> None:
    cert_path, key_path = make_client_cert(tmp_path, *ca, "carol", "user")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(cert_path.read_bytes() + ca[0].read_bytes())
    chain, _ = read_credentials(bundle, key_path)
    assert chain == [load(cert_path), load(ca[0])]


# The command line


def test_cli_dev(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "certs"
    assert main(["dev", str(directory)]) == 0
    assert {path.name for path in directory.iterdir()} == DEV_FILES
    ca = (directory / "ca.pem").read_bytes()
    assert main(["dev", str(directory)]) == 0
    assert (directory / "ca.pem").read_bytes() == ca
    assert "as it is" in capsys.readouterr().out
    assert main(["dev", str(directory), "--force"]) == 0
    assert (directory / "ca.pem").read_bytes() != ca


def test_cli_dev_default_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["dev"]) == 0
    assert {path.name for path in (tmp_path / "certs").iterdir()} == DEV_FILES


def test_cli_ca_server_client(tmp_path: Path) -> None:
    assert main(["ca", str(tmp_path)]) == 0
    assert main(
        ["server", str(tmp_path), "--hostname", "jobs.example.org", "--hostname", "192.0.2.7"]
    ) == 0
    assert main(["client", str(tmp_path), "--cn", "carol", "--role", "user"]) == 0
    ca = load(tmp_path / "ca.pem")
    server = load(tmp_path / "server.pem")
    client = load(tmp_path / "carol.pem")
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    assert extension(server, x509.SubjectAlternativeName).value.get_values_for_type(
        x509.IPAddress
    ) == [ipaddress.ip_address("192.0.2.7")]
    assert names(client, NameOID.COMMON_NAME) == ["carol"]
    assert names(client, NameOID.ORGANIZATIONAL_UNIT_NAME) == ["user"]
    assert mode(tmp_path / "carol.key") == 0o600


def test_cli_will_not_replace_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ca", str(tmp_path)]) == 0
    ca = (tmp_path / "ca.pem").read_bytes()
    capsys.readouterr()
    assert main(["ca", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "exists" in error and "ca.pem" in error
    assert (tmp_path / "ca.pem").read_bytes() == ca
    assert main(["ca", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "ca.pem").read_bytes() != ca


def test_cli_error_without_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["client", str(tmp_path), "--cn", "carol", "--role", "user"]) == 1
    error = capsys.readouterr().err
    assert error == (
        f"jobworker-pki: error: cannot read {tmp_path}/ca.pem: No such file or directory\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_cli_usage_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["client", str(tmp_path), "--role", "user"])
    assert exit.value.code == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--cn" in error


def test_cli_as_a_program(tmp_path: Path) -> None:
    """
    Run as a program, the tool exits 1 with its one-line error.
    """
    result = subprocess.run(
        [sys.executable, "-m", "jobworker.pki", "server", str(tmp_path), "--hostname", "h"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert result.returncode == 1
    assert result.stderr.startswith("jobworker-pki: error: cannot read ")
    assert result.stderr.count("\n") == 1
