"""TLS for the Kafka tests: a private CA and its certificates, and a TLS-terminating front for a plaintext broker.

Tansu is plaintext only (its --cert/--key are ignored, /work/shared/ENVIRONMENT.md), so ``TlsFront`` terminates
TLS on one port and forwards the bytes to Tansu, which is started with that port as its advertised listener:
every connection a client makes, also the ones it opens after reading the metadata, goes through TLS.

``TlsFront.serve(cert, require_client)`` swaps what the front presents (a good, expired or wrong-host server
certificate) and whether it demands a client certificate (mTLS): the listening socket is rebuilt on the same port
and open connections are dropped, so each test sets the mode it needs and clients reconnect under it.

Traps:
- TLS 1.3 with a required client certificate: the client's handshake completes before the server checks the
  certificate, so a client without one sees the server's "certificate required" alert on its first read, not in
  the handshake (tests check the worker still names the setting).
- One thread per connection carries both directions (select): an OpenSSL connection must not be read and
  written by two threads at once, as a thread-per-direction proxy would. Not asyncio: its TLS server closes a
  connection whose client certificate it refused without sending the alert, which no real broker does.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import select
import socket
import ssl
import threading
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KEY_PASSWORD = "client-key-pass"


@dataclass(frozen=True)
class Pki:
    """Paths of PEM files: ``ca`` signed every certificate here but ``other_ca``'s."""

    ca: str
    other_ca: str
    server: tuple[str, str]  # (cert, key): SAN localhost and 127.0.0.1
    expired: tuple[str, str]  # same names, expired yesterday
    wrong_host: tuple[str, str]  # SAN elsewhere.invalid only
    ip_only: tuple[str, str]  # SAN 127.0.0.1 only: good for the bootstrap address, not the advertised localhost
    client: tuple[str, str]  # (cert, key); the key is encrypted with KEY_PASSWORD
    client_plain_key: str  # the same client key, unencrypted


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey, password: str | None = None) -> bytes:
    enc = (serialization.BestAvailableEncryption(password.encode()) if password
           else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _leaf(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], cn: str, dns: list[str], ips: list[str],
          usage: x509.ObjectIdentifier, expired: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    start, end = ((now - dt.timedelta(days=30), now - dt.timedelta(days=1)) if expired
                  else (now - dt.timedelta(days=1), now + dt.timedelta(days=30)))
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(folder: str) -> Pki:
    """Generate the CA, the other CA and every certificate the TLS tests use, as PEM files in ``folder``."""
    ca = _ca("scoring-workers test CA")
    other = _ca("some other CA")

    def pair(name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
             password: str | None = None) -> tuple[str, str]:
        return (_write(os.path.join(folder, f"{name}.pem"), cert.public_bytes(serialization.Encoding.PEM)),
                _write(os.path.join(folder, f"{name}-key.pem"), _key_pem(key, password)))

    server = ExtendedKeyUsageOID.SERVER_AUTH
    here = (["localhost"], ["127.0.0.1"])
    client_cert, client_key = _leaf(ca, "scoring-worker", [], [], ExtendedKeyUsageOID.CLIENT_AUTH)
    client = pair("client", client_cert, client_key, KEY_PASSWORD)
    return Pki(
        ca=_write(os.path.join(folder, "ca.pem"), ca[0].public_bytes(serialization.Encoding.PEM)),
        other_ca=_write(os.path.join(folder, "other-ca.pem"), other[0].public_bytes(serialization.Encoding.PEM)),
        server=pair("server", *_leaf(ca, "broker", *here, server)),
        expired=pair("expired", *_leaf(ca, "broker", *here, server, expired=True)),
        wrong_host=pair("wrong-host", *_leaf(ca, "broker", ["elsewhere.invalid"], [], server)),
        ip_only=pair("ip-only", *_leaf(ca, "broker", [], ["127.0.0.1"], server)),
        client=client,
        client_plain_key=_write(os.path.join(folder, "client-plain-key.pem"), _key_pem(client_key)),
    )


class TlsFront:
    """TLS on ``port`` (127.0.0.1), plaintext to ``target_port``; see the module docstring."""

    def __init__(self, target_port: int, ca: str):
        self.target = ("127.0.0.1", target_port)
        self.ca = ca
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.ctx: ssl.SSLContext | None = None
        self.mode: tuple[tuple[str, str], bool] | None = None
        self.conns: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def serve(self, cert: tuple[str, str], require_client: bool = False) -> None:
        """Present ``cert`` (cert, key) from now on, demanding a client certificate signed by the CA when
        ``require_client``; drops every open connection when the mode changes."""
        if self.mode == (cert, require_client):
            return
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(*cert)
        if require_client:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(self.ca)
        self.ctx, self.mode = ctx, (cert, require_client)
        self._drop()

    def _drop(self) -> None:
        with self.lock:
            for s in self.conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.conns.clear()

    def _accept(self) -> None:
        while not self.closed:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve_one, args=(raw, self.ctx), daemon=True).start()

    def _serve_one(self, raw: socket.socket, ctx: ssl.SSLContext | None) -> None:
        """One connection on one thread (an OpenSSL connection must not be used by two threads at once): the
        handshake (blocking, so a refused client gets OpenSSL's alert), then both directions by select."""
        up: socket.socket | None = None
        conn: socket.socket = raw
        try:
            raw.settimeout(10)
            assert ctx is not None
            conn = ctx.wrap_socket(raw, server_side=True)
            conn.settimeout(None)
            up = socket.create_connection(self.target, timeout=5)
            up.settimeout(None)
            with self.lock:
                self.conns |= {conn, up}
            while True:
                ready, _, _ = select.select([conn, up], [], [], 1.0)
                if self.closed:
                    return
                if conn in ready:
                    data = conn.recv(65536)
                    while data and conn.pending():  # type: ignore[attr-defined]
                        data += conn.recv(65536)
                    if not data:
                        return
                    up.sendall(data)
                if up in ready:
                    data = up.recv(65536)
                    if not data:
                        return
                    conn.sendall(data)
        except (OSError, ValueError):  # ssl.SSLError is an OSError: a refused handshake ends here
            return
        finally:
            for s in (conn, up):
                if s is not None:
                    with self.lock:
                        self.conns.discard(s)
                    try:
                        s.close()
                    except OSError:
                        pass

    def close(self) -> None:
        self.closed = True
        self._drop()
        self.listener.close()


@dataclass
class TlsBroker:
    """The session's TLS broker: ``front`` (set its mode per test), ``bootstrap`` and the certificates."""

    front: TlsFront
    bootstrap: str
    pki: Pki

    def client_config(self) -> dict[str, str]:
        """librdkafka properties for the tests' own clients: verify the broker, present the client certificate
        (accepted whether or not the front demands one)."""
        return {"security.protocol": "SSL", "ssl.ca.location": self.pki.ca,
                "ssl.certificate.location": self.pki.client[0], "ssl.key.location": self.pki.client[1],
                "ssl.key.password": KEY_PASSWORD}

    def env(self, ca: str | None = None, client: bool = False, **more: str) -> dict[str, str]:
        """The worker's settings for this broker (env vars): server verification, and mTLS when ``client``."""
        env = {"SCORING_KAFKA__SECURITY_PROTOCOL": "SSL", "SCORING_KAFKA__SSL_CAFILE": ca or self.pki.ca}
        if client:
            env |= {"SCORING_KAFKA__SSL_CERTFILE": self.pki.client[0],
                    "SCORING_KAFKA__SSL_KEYFILE": self.pki.client[1],
                    "SCORING_KAFKA__SSL_KEY_PASSWORD": KEY_PASSWORD}
        return env | more
