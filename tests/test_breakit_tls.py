"""Break-it review of Kafka over TLS with the PKI real deployments have: a root CA and an intermediate that signs the
broker's and the worker's certificates, a CA bundle holding several certificates, client keys as PKCS#1 RSA
(plain and encrypted), SEC1 EC and encrypted PKCS#8, files under paths with spaces, and the broker reached as
``localhost`` and as 127.0.0.1.

The broker is the session's Tansu behind the TLS front of ``tests/tls_util.py``; each case runs the real
``scoring-worker check`` process (which makes the stream worker's first connection, probes and all) and expects
it to pass, or to fail with exit 2 and one line naming the setting to fix.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
import sys
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.test_kafka_tls import _clean_env

pytestmark = pytest.mark.kafka

PASSWORD = "s3cret pass"  # noqa: S105 - a test key's password


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: tuple[x509.Certificate, object] | None, ca: bool,
          usage=None, dns=(), ips=()) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    b = (x509.CertificateBuilder().subject_name(_name(subject))
         .issuer_name(issuer_cert.subject if issuer_cert else _name(subject))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    if usage:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key(key, fmt, password: str | None = None) -> bytes:
    enc = serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, fmt, enc)


@dataclass
class Chain:
    root: str
    intermediate: str
    bundle: str  # another CA, then the root
    bundle_with_intermediate: str  # the root and the intermediate
    server_chain: tuple[str, str]  # leaf + intermediate, key
    server_leaf_only: tuple[str, str]  # the leaf alone, key
    clients: dict[str, tuple[str, str, str | None]]  # key format -> (cert chain, key, password)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Chain:
    folder = tmp_path_factory.mktemp("pki with spaces") / "my certs"
    folder.mkdir()

    def write(name: str, data: bytes) -> str:
        path = folder / name
        path.write_bytes(data)
        return str(path)

    root_key = ec.generate_private_key(ec.SECP384R1())
    root = _cert("review root CA", root_key, None, ca=True)
    mid_key = ec.generate_private_key(ec.SECP256R1())
    mid = _cert("review intermediate CA", mid_key, (root, root_key), ca=True)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _cert("unrelated CA", other_key, None, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _cert("broker", server_key, (mid, mid_key), ca=False, usage=ExtendedKeyUsageOID.SERVER_AUTH,
                   dns=["localhost"], ips=["127.0.0.1", "::1"])
    server_key_pem = write("server key.pem", _key(server_key, serialization.PrivateFormat.PKCS8))
    clients = {}
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    for label, key, fmt, password in (
            ("rsa-pkcs1", rsa_key, serialization.PrivateFormat.TraditionalOpenSSL, None),
            ("rsa-pkcs1-encrypted", rsa_key, serialization.PrivateFormat.TraditionalOpenSSL, PASSWORD),
            ("ec-sec1", ec_key, serialization.PrivateFormat.TraditionalOpenSSL, None),
            ("ec-pkcs8-encrypted", ec_key, serialization.PrivateFormat.PKCS8, PASSWORD)):
        cert = _cert(f"worker {label}", key, (mid, mid_key), ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        clients[label] = (write(f"client {label}.pem", _pem(cert) + _pem(mid)),
                          write(f"client {label} key.pem", _key(key, fmt, password)), password)
    return Chain(
        root=write("root.pem", _pem(root)), intermediate=write("intermediate.pem", _pem(mid)),
        bundle=write("bundle.pem", _pem(other) + _pem(root)),
        bundle_with_intermediate=write("bundle2.pem", _pem(root) + _pem(mid)),
        server_chain=(write("server chain.pem", _pem(server) + _pem(mid)), server_key_pem),
        server_leaf_only=(write("server leaf.pem", _pem(server)), server_key_pem),
        clients=clients)


@pytest.fixture
def front(tls_broker, chain, models):
    """The session's TLS front, verifying client certificates against this module's root; put back after."""
    tls_broker.model = models["binary"]
    old_ca = tls_broker.front.ca
    tls_broker.front.ca = chain.root
    yield tls_broker
    tls_broker.front.ca = old_ca
    tls_broker.front.mode = None  # the next serve() rebuilds with the session's CA
    tls_broker.front.serve(tls_broker.pki.server)


def check(broker, bootstrap: str, env: dict[str, str], tmp_path) -> tuple[int, str, str]:
    cmd = [sys.executable, "-m", "workers", "check", "--model", broker.model, "--bootstrap-servers", bootstrap,
           "--topic", "tls-review", "--sink", f"sqlite:///{tmp_path}/s.db?table=scores"]
    proc = subprocess.run(cmd, env={**_clean_env(), "SCORING_KAFKA__SECURITY_PROTOCOL": "SSL", **env},
                          capture_output=True, text=True, timeout=90)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.returncode, proc.stdout, proc.stderr


def _broker_line(out: str) -> str:
    return next(line for line in out.splitlines() if "broker" in line)


@pytest.mark.parametrize("client_key", ["rsa-pkcs1", "rsa-pkcs1-encrypted", "ec-sec1", "ec-pkcs8-encrypted"])
def test_mtls_through_an_intermediate_ca_with_every_key_format_and_spaces_in_paths(front, chain, tmp_path,
                                                                                    client_key):
    front.front.serve(chain.server_chain, require_client=True)
    cert, key, password = chain.clients[client_key]
    env = {"SCORING_KAFKA__SSL_CAFILE": chain.bundle, "SCORING_KAFKA__SSL_CERTFILE": cert,
           "SCORING_KAFKA__SSL_KEYFILE": key}
    if password:
        env["SCORING_KAFKA__SSL_KEY_PASSWORD"] = password
    rc, out, err = check(front, front.bootstrap, env, tmp_path)
    assert _broker_line(out).startswith("ok   broker"), out + err
    if password:  # a wrong password is named before any connection
        env["SCORING_KAFKA__SSL_KEY_PASSWORD"] = "wrong"
        rc, out, err = check(front, front.bootstrap, env, tmp_path)
        assert rc != 0 and "SCORING_KAFKA__SSL_KEY_PASSWORD" in out + err, out + err
        assert PASSWORD not in out + err


@pytest.mark.parametrize("server, bundle, ok", [
    ("server_chain", "root", True),  # the broker sends its intermediate: the root alone verifies it
    ("server_leaf_only", "bundle_with_intermediate", True),  # the bundle holds the intermediate
    ("server_leaf_only", "root", False),  # nobody has the intermediate: the CA setting is named
    ("server_chain", "intermediate", False),  # an intermediate is not a trust anchor (no partial chains)
])
def test_intermediate_ca_chains_verify_as_librdkafka_verifies_them(front, chain, tmp_path, server, bundle, ok):
    front.front.serve(getattr(chain, server))
    rc, out, err = check(front, front.bootstrap, {"SCORING_KAFKA__SSL_CAFILE": getattr(chain, bundle)}, tmp_path)
    line = _broker_line(out)
    if ok:
        assert line.startswith("ok   broker"), out + err
    else:
        assert line.startswith("FAIL broker: SCORING_KAFKA__SSL_CAFILE: ") and "cannot verify" in line, out + err


def test_the_broker_by_localhost_name_and_by_ip(front, chain, tmp_path):
    front.front.serve(chain.server_chain)
    port = front.bootstrap.rsplit(":", 1)[1]
    for bootstrap in (f"localhost:{port}", f"127.0.0.1:{port}"):
        rc, out, err = check(front, bootstrap, {"SCORING_KAFKA__SSL_CAFILE": chain.root}, tmp_path)
        assert _broker_line(out).startswith("ok   broker"), (bootstrap, out + err)
