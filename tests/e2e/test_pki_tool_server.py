"""
A certificate that C{jobworker-pki sign} makes from a CSR made with openssl
is accepted by a real server; the PKI tool's own tests are
L{tests.unit.test_pki_tool}.
"""

from __future__ import annotations

import shutil
import subprocess
from datetime import timedelta

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.support import BIN
from tests.unit.test_pki_tool import certificate, lifetime, openssl_csr, pki


def test_sign_an_openssl_csr_gives_a_certificate_the_server_accepts(server, certs, tmp_path):
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    for name in ("ca.pem", "ca.key"):
        shutil.copy(certs / name, ca_dir / name)
    requester = tmp_path / "requester"
    requester.mkdir()
    # The requester asks for admin; the CA decides the role.
    key, csr = openssl_csr(requester, "/CN=dana/OU=admin")
    result = pki("sign", str(ca_dir), str(csr), "--role", "user", "--days", "10")
    assert result.returncode == 0, result.stderr
    signed = ca_dir / "dana.pem"
    assert result.stdout.strip() == str(signed)
    cert = certificate(signed)
    assert cert.subject.rfc4514_string() == "OU=user,CN=dana"
    assert cert.public_key() == x509.load_pem_x509_csr(csr.read_bytes()).public_key()
    assert lifetime(signed) == timedelta(days=10)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not (ca_dir / "dana.key").exists()  # the key never travelled
    env = dict(server.env(), JOBWORKER_CERT=str(signed), JOBWORKER_KEY=str(key))
    whoami = subprocess.run([str(BIN / "jobcli"), "whoami"], env=env, capture_output=True, text=True, timeout=60)
    assert whoami.returncode == 0, whoami.stderr
    assert whoami.stdout.startswith("dana (user) on ")
    # Signing again without --force would replace it: refused.
    again = pki("sign", str(ca_dir), str(csr), "--role", "user")
    assert again.returncode == 1 and "exists" in again.stderr
