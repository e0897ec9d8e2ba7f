"""Why a Kafka client cannot use the broker, in one line naming the setting to fix: TLS files, certificates,
the security protocol.

librdkafka says little: every certificate verification failure is "certificate verify failed: broker
certificate could not be verified, verify that ssl.ca.location is correctly configured" (an expired certificate
and a wrong host alike), a broker that demands a client certificate shows only as "1/1 brokers are down", and
a TLS client talking to a plaintext listener (or the reverse) as "Broker transport failure". So when a client
cannot reach the broker, ``probe`` connects once with Python's ``ssl`` and the same settings (CA,
hostname check, client certificate) and reads the exact reason OpenSSL gives:

- not signed by a CA in the bundle -> ConfigError ``SCORING_KAFKA__SSL_CAFILE`` (exit 2);
- not valid for the host connected to -> ConfigError ``SCORING_KAFKA__SSL_CHECK_HOSTNAME`` (exit 2);
- expired or not yet valid -> ScoringError naming ``SCORING_KAFKA__SSL_CAFILE`` (exit 1: the broker's
  certificate must be renewed, no setting here is wrong);
- a client certificate demanded but none configured, or refused -> ConfigError ``SCORING_KAFKA__SSL_CERTFILE``;
- TLS against a listener that does not speak it, or plaintext against one that does -> ConfigError
  ``SCORING_KAFKA__SECURITY_PROTOCOL``;
- anything else (nothing listens, the broker does not answer) -> ScoringError "cannot reach Kafka" (exit 1),
  as before.

``reach`` is how every client of the worker gets its first metadata (stream source, batch queue, ``check``):
it probes after the first failed attempt, so a TLS failure is named in about two seconds, not after the whole
wait; a probe that finds nothing leaves the wait as it was. Then ``check_brokers`` probes the brokers the
metadata names: a client reaches the bootstrap address and then connects to each advertised one, whose
certificate may not hold the advertised name; librdkafka would retry those connections forever while the
worker looks alive. A broker whose certificate goes bad after start-up is not caught here (the consumer logs
librdkafka's error, once a minute).

A closed connection right after the handshake, without an answer to ApiVersions, is read as "a client
certificate is demanded" when none is configured: a Kafka broker answers ApiVersions even before SASL.

``check_files`` refuses, before any client is built, a TLS file that does not exist or cannot be read, a key
that is not the certificate's, and an encrypted key without its password (librdkafka: "ssl.key.location failed:
PEM lib"; Python's ``ssl`` would even prompt for the password on a terminal: a callable password prevents it).

Trap: with TLS 1.3 a server checks the client's certificate after the client's side of the handshake is done,
so a missing or refused client certificate shows on the first read. The probe therefore sends one Kafka
ApiVersions request (allowed before SASL) and reads the answer's first bytes.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import time
from typing import TYPE_CHECKING, Any

from workers.errors import ConfigError, ScoringError

if TYPE_CHECKING:
    from workers.settings import KafkaSettings

PROBE_TIMEOUT_S = 5.0
REACH_TIMEOUT_S = 10.0  # how long a client waits for the broker at start-up (as before: list_topics(timeout=10))
ATTEMPT_S = 2.0
CAFILE = "SCORING_KAFKA__SSL_CAFILE"
CERTFILE = "SCORING_KAFKA__SSL_CERTFILE"
KEYFILE = "SCORING_KAFKA__SSL_KEYFILE"
KEY_PASSWORD = "SCORING_KAFKA__SSL_KEY_PASSWORD"  # noqa: S105 - the setting's name, not a password
CHECK_HOSTNAME = "SCORING_KAFKA__SSL_CHECK_HOSTNAME"
PROTOCOL = "SCORING_KAFKA__SECURITY_PROTOCOL"

# OpenSSL verify codes (X509_V_ERR_*).
_EXPIRED = {9, 10}  # not yet valid, has expired
_HOSTNAME = {62, 64}  # host name, IP address mismatch
# Alerts a server sends when it wants a client certificate it did not get, or refuses the one it got.
_WANTS_CERT = ("CERTIFICATE_REQUIRED", "HANDSHAKE_FAILURE")
_REFUSED_CERT = ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "CERTIFICATE_EXPIRED",
                 "CERTIFICATE_REVOKED", "UNSUPPORTED_CERTIFICATE", "ACCESS_DENIED", "DECRYPT_ERROR")


def check_files(kafka: KafkaSettings) -> None:
    """ConfigError naming the setting when a TLS file is missing, unreadable or does not fit."""
    for setting, path in ((CAFILE, kafka.ssl_cafile), (CERTFILE, kafka.ssl_certfile), (KEYFILE, kafka.ssl_keyfile)):
        if path is None:
            continue
        if not os.path.isfile(path):
            raise ConfigError(setting, f"{path} does not exist (or is not a file)")
        if not os.access(path, os.R_OK):
            raise ConfigError(setting, f"{path} cannot be read by this process")
    if kafka.ssl_certfile and not kafka.ssl_keyfile:
        raise ConfigError(KEYFILE, f"must be set with {CERTFILE} (the certificate's private key)")
    if kafka.ssl_keyfile and not kafka.ssl_certfile:
        raise ConfigError(CERTFILE, f"must be set with {KEYFILE} (the key's certificate)")
    if kafka.ssl_cafile:
        try:
            ssl.create_default_context(cafile=kafka.ssl_cafile)
        except ssl.SSLError as exc:
            raise ConfigError(CAFILE, f"{kafka.ssl_cafile} is not a PEM CA bundle ({_reason(exc)})") from None
    if kafka.ssl_certfile and kafka.ssl_keyfile:
        _load_client_cert(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), kafka)


def _load_client_cert(ctx: ssl.SSLContext, kafka: KafkaSettings) -> None:
    password = kafka.ssl_key_password.get_secret_value() if kafka.ssl_key_password else ""
    keyfile = kafka.ssl_keyfile or ""
    with open(keyfile, "rb") as f:
        encrypted = b"ENCRYPTED" in f.read()
    if encrypted and not password:
        raise ConfigError(KEY_PASSWORD, f"{keyfile} is encrypted: set its password")
    try:
        ctx.load_cert_chain(kafka.ssl_certfile or "", keyfile, password=lambda: password)
    except ssl.SSLError as exc:
        why = _reason(exc)
        if "KEY_VALUES_MISMATCH" in why:
            raise ConfigError(KEYFILE, f"{keyfile} is not the private key of {kafka.ssl_certfile}") from None
        if encrypted:
            raise ConfigError(KEY_PASSWORD, f"does not decrypt {keyfile} ({why})") from None
        raise ConfigError(CERTFILE, f"cannot load {kafka.ssl_certfile} with {keyfile} ({why})") from None


def _reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc)


def _addresses(servers: str) -> list[tuple[str, int]]:
    out = []
    for item in servers.split(","):
        item = item.strip().split("://")[-1]
        host, _, port = item.rpartition(":")
        if host and port.isdigit():
            out.append((host.strip("[]"), int(port)))
    return out


def probe_bootstrap(kafka: KafkaSettings) -> ScoringError | None:
    """The TLS or protocol problem of the first bootstrap server that shows one (``probe``), else that of a broker
    the bootstrap servers advertise (asked with our own Metadata request: librdkafka may have taken its metadata
    already and then only try the advertised brokers, so ``list_topics`` times out and the metadata that
    ``check_brokers`` needs never comes), else None."""
    addresses = _addresses(kafka.bootstrap_servers)
    for host, port in addresses:
        problem = probe(kafka, host, port)
        if problem is not None:
            return problem
    if not kafka.security_protocol.endswith("SSL"):
        return None
    for host, port in addresses:
        brokers = advertised(kafka, host, port)
        for b_host, b_port in brokers:
            if (b_host, b_port) != (host, port):
                problem = probe(kafka, b_host, b_port)
                if problem is not None:
                    return problem
        if brokers:
            return None
    return None


def _metadata_v1(client_id: str) -> bytes:
    cid = client_id.encode()[:200]
    # Metadata v1, correlation id 2, an empty topic list (v1: no topics, only the brokers).
    body = struct.pack(">hhih", 3, 1, 2, len(cid)) + cid + struct.pack(">i", 0)
    return struct.pack(">i", len(body)) + body


def advertised(kafka: KafkaSettings, host: str, port: int) -> list[tuple[str, int]]:
    """The brokers ``host:port`` advertises (host, port), from one Metadata v1 request over TLS; [] when it
    cannot be asked (any failure: the probes of the addresses themselves say what is wrong)."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as sock, \
                _client_context(kafka).wrap_socket(sock, server_hostname=host) as conn:
            conn.sendall(_metadata_v1(kafka.client_id))
            data = b""
            while len(data) < 4 or len(data) < 4 + struct.unpack(">i", data[:4])[0]:
                chunk = conn.recv(65536)
                if not chunk:
                    return []
                data += chunk
                if len(data) > 1 << 20:
                    return []
    except (OSError, ValueError):
        return []
    try:
        pos = 8  # size, correlation id
        (count,) = struct.unpack_from(">i", data, pos)
        pos += 4
        out = []
        for _ in range(max(0, min(count, 1000))):
            _node, n = struct.unpack_from(">ih", data, pos)
            pos += 6
            name = data[pos:pos + n].decode()
            pos += n
            (b_port,) = struct.unpack_from(">i", data, pos)
            pos += 4
            (rack,) = struct.unpack_from(">h", data, pos)
            pos += 2 + max(rack, 0)
            out.append((name, b_port))
        return out
    except (struct.error, UnicodeDecodeError):
        return []


def reach(client: Any, kafka: KafkaSettings, timeout: float = REACH_TIMEOUT_S) -> Any:
    """The metadata (``list_topics``) from ``client`` (a confluent-kafka Consumer, Producer or AdminClient),
    every advertised broker probed (``check_brokers``). Raises the named problem at the first failed attempt
    that a probe explains (a TLS failure takes about ``ATTEMPT_S``, not the whole ``timeout``), else
    ScoringError "cannot reach Kafka" after ``timeout``. The caller closes the client on error."""
    from confluent_kafka import KafkaError, KafkaException

    deadline = time.monotonic() + timeout
    probed = False
    while True:
        try:
            metadata = client.list_topics(timeout=max(min(ATTEMPT_S, deadline - time.monotonic()), 0.1))
            break
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            reason = err.str() if isinstance(err, KafkaError) else str(exc)
            if not probed:  # once: a TLS problem does not go away by waiting
                probed = True
                problem = probe_bootstrap(kafka)
                if problem is not None:
                    raise problem from None
            if time.monotonic() >= deadline:
                raise ScoringError(f"cannot reach Kafka at {kafka.bootstrap_servers}: {' '.join(reason.split())}") \
                    from None
    check_brokers(kafka, metadata)
    return metadata


def check_brokers(kafka: KafkaSettings, metadata: Any) -> None:
    """Probe every broker the metadata (``list_topics``' answer) advertises; raise the first problem."""
    if not kafka.security_protocol.endswith("SSL"):
        return
    for broker in getattr(metadata, "brokers", {}).values():
        problem = probe(kafka, broker.host, broker.port)
        if problem is not None:
            raise problem


def _client_context(kafka: KafkaSettings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=kafka.ssl_cafile)
    ctx.check_hostname = kafka.ssl_check_hostname
    if kafka.ssl_certfile and kafka.ssl_keyfile:
        _load_client_cert(ctx, kafka)
    return ctx


def _api_versions(client_id: str) -> bytes:
    cid = client_id.encode()[:200]
    body = struct.pack(">hhih", 18, 0, 1, len(cid)) + cid  # ApiVersions v0, correlation id 1
    return struct.pack(">i", len(body)) + body


def probe(kafka: KafkaSettings, host: str, port: int) -> ScoringError | None:
    """Connect to ``host:port`` as the client would and return the TLS or protocol problem found, if any
    (None: no such problem, or nothing answers there)."""
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S)
    except OSError:
        return None  # not reachable: not a TLS matter
    with sock:
        if not kafka.security_protocol.endswith("SSL"):
            return _speaks_tls(kafka, sock, host, where)
        try:
            conn = _client_context(kafka).wrap_socket(sock, server_hostname=host)
        except ssl.SSLCertVerificationError as exc:
            return _verify_problem(kafka, exc, where, host)
        except ssl.SSLError as exc:
            return _alert_problem(kafka, _reason(exc), where) or _not_tls(kafka, where, _reason(exc))
        except OSError as exc:  # closed or silent during the handshake: not a TLS listener
            return _not_tls(kafka, where, str(exc) or type(exc).__name__)
        with conn:
            return _first_answer(kafka, conn, where)
    return None


def _first_answer(kafka: KafkaSettings, conn: ssl.SSLSocket, where: str) -> ScoringError | None:
    """After the handshake: one ApiVersions request. Any answer is fine; an alert or a close instead is the
    server refusing the client (TLS 1.3 checks the client certificate after the client's handshake is done)."""
    try:
        try:
            conn.sendall(_api_versions(kafka.client_id))
        except ssl.SSLEOFError:
            pass  # the server already closed: read its alert below
        if conn.recv(4):
            return None
        why = "closed without an answer"
    except ssl.SSLError as exc:
        found = _alert_problem(kafka, _reason(exc), where)
        if found is not None:
            return found
        why = _reason(exc)
    except OSError:
        return None  # silent (a timeout): not a TLS matter
    if not kafka.ssl_certfile:  # a Kafka broker answers ApiVersions, even before SASL: it refused us
        return ConfigError(CERTFILE, f"the broker at {where} closed the TLS connection without answering ({why}); "
                           f"a broker that demands a client certificate does so: set {CERTFILE} and {KEYFILE}")
    return None


def _verify_problem(kafka: KafkaSettings, exc: ssl.SSLCertVerificationError, where: str,
                    host: str) -> ScoringError:
    message = exc.verify_message or _reason(exc)
    bundle = kafka.ssl_cafile or "the system's CA certificates"
    if exc.verify_code in _HOSTNAME:
        return ConfigError(CHECK_HOSTNAME, f"the broker at {where} presents a certificate not valid for {host!r} "
                           f"({message}): connect by a name the certificate holds (SCORING_KAFKA__BOOTSTRAP_SERVERS, "
                           f"or the broker's advertised listener), or set {CHECK_HOSTNAME}=false")
    if exc.verify_code in _EXPIRED:
        return ScoringError(f"{CAFILE}: the broker at {where} presents a certificate that is not valid now "
                            f"({message}; checked against {bundle}): the broker's certificate must be renewed")
    return ConfigError(CAFILE, f"the broker at {where} presents a certificate that {bundle} cannot verify "
                       f"({message}): set it to the CA that signed the broker's certificate")


def _alert_problem(kafka: KafkaSettings, why: str, where: str) -> ConfigError | None:
    upper = why.upper()
    if not kafka.ssl_certfile and any(a in upper for a in _WANTS_CERT):
        return ConfigError(CERTFILE, f"the broker at {where} demands a client certificate ({why}): set "
                           f"{CERTFILE} and {KEYFILE}")
    if kafka.ssl_certfile and any(a in upper for a in _REFUSED_CERT + _WANTS_CERT):
        return ConfigError(CERTFILE, f"the broker at {where} refused the client certificate "
                           f"{kafka.ssl_certfile} ({why})")
    return None


def _not_tls(kafka: KafkaSettings, where: str, why: str) -> ConfigError:
    return ConfigError(PROTOCOL, f"is {kafka.security_protocol} but the broker at {where} did not complete a TLS "
                       f"handshake ({why}): is it a plaintext listener?")


def _speaks_tls(kafka: KafkaSettings, sock: socket.socket, host: str, where: str) -> ConfigError | None:
    """A plaintext client (PLAINTEXT, SASL_PLAINTEXT) at a TLS listener: the broker answers a TLS handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only asking whether TLS is spoken there; nothing is sent
    try:
        ctx.wrap_socket(sock, server_hostname=host).close()
    except (ssl.SSLError, OSError):
        return None
    tls = "SASL_SSL" if kafka.security_protocol.startswith("SASL") else "SSL"
    return ConfigError(PROTOCOL, f"is {kafka.security_protocol} but the broker at {where} speaks TLS: set it to "
                       f"{tls} (and {CAFILE} to the broker's CA)")
