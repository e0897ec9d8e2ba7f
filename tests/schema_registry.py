"""A small Confluent-compatible Schema Registry for tests (no registry server installs here).

It implements the REST subset confluent-kafka's serializers and our reader use: ``POST /subjects/{s}/versions``
(register; the same schema gets the same id), ``POST /subjects/{s}`` (look up), ``GET /schemas/ids/{id}``
(``?format=serialized`` answers what a Protobuf serializer registered: a base64 FileDescriptorProto),
``GET /subjects/{s}/versions/{n|latest}``, ``GET /schemas/types``, and a 404 JSON answer for anything else
(confluent-kafka 2.16 asks ``/associations/...`` first and falls back on that). Switches: ``fail_status``
(answer every request with that status), ``stop()``/``start()`` (the port refuses connections); optional basic auth and HTTPS. A threaded stdlib HTTP server, on 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit


class TestRegistry:
    __test__ = False  # not a pytest class

    def __init__(self, users: dict[str, str] | None = None, tls: tuple[str, str] | None = None):
        self.users = users
        self.tls = tls
        self.schemas: dict[int, dict[str, Any]] = {}  # id -> {"schema", "schemaType", "references"}
        self.subjects: dict[str, list[int]] = {}  # subject -> ids, one per version
        self.fail_status: int | None = None
        self.requests: list[str] = []  # paths asked, in order (caching checks)
        self.lock = threading.Lock()
        self.port = 0
        self.server: ThreadingHTTPServer | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{'localhost' if self.tls else '127.0.0.1'}:{self.port}"

    def start(self) -> None:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                registry.handle(self, None)

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                registry.handle(self, self.rfile.read(length))

        ThreadingHTTPServer.allow_reuse_address = True
        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self.tls)
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self.server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Go away: the port refuses connections until ``start()``."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    # -- what tests call -----------------------------------------------------------------------------
    def register(self, subject: str, schema: str, schema_type: str = "AVRO", references: list | None = None) -> int:
        with self.lock:
            record = {"schema": schema, "schemaType": schema_type, "references": references or []}
            sid = next((k for k, known in self.schemas.items() if known == record), 0)
            if not sid:
                sid = len(self.schemas) + 1
                self.schemas[sid] = record
            versions = self.subjects.setdefault(subject, [])
            if sid not in versions:
                versions.append(sid)
            return sid

    def id_requests(self) -> int:
        return sum(1 for p in self.requests if p.startswith("/schemas/ids/"))

    # -- HTTP ----------------------------------------------------------------------------------------
    def _reply(self, h: BaseHTTPRequestHandler, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _authorized(self, h: BaseHTTPRequestHandler) -> bool:
        if self.users is None:
            return True
        got = h.headers.get("Authorization", "")
        if not got.startswith("Basic "):
            return False
        user, _, password = base64.b64decode(got[6:]).decode().partition(":")
        return self.users.get(user) == password

    def _version(self, subject: str, sid: int, version: int) -> dict:
        record = self.schemas[sid]
        return {"subject": subject, "version": version, "id": sid, **record}

    def handle(self, h: BaseHTTPRequestHandler, body: bytes | None) -> None:
        parts = urlsplit(h.path)
        path = parts.path
        self.requests.append(path)
        if self.fail_status is not None:
            self._reply(h, self.fail_status, {"error_code": self.fail_status * 100, "message": "switched to fail"})
            return
        if not self._authorized(h):
            self._reply(h, 401, {"error_code": 401, "message": "Unauthorized"})
            return
        not_found = {"error_code": 40403, "message": "Schema not found"}
        if path == "/schemas/types" and body is None:
            self._reply(h, 200, ["AVRO", "PROTOBUF", "JSON"])
            return
        m = re.fullmatch(r"/schemas/ids/(\d+)", path)
        if m and body is None:
            record = self.schemas.get(int(m.group(1)))
            self._reply(h, 200, record) if record else self._reply(h, 404, not_found)
            return
        m = re.fullmatch(r"/subjects/([^/]+)/versions", path)
        if m and body is not None:
            doc = json.loads(body)
            sid = self.register(unquote(m.group(1)), doc["schema"], doc.get("schemaType", "AVRO"),
                                doc.get("references"))
            self._reply(h, 200, {"id": sid})
            return
        m = re.fullmatch(r"/subjects/([^/]+)/versions/(latest|\d+)", path)
        if m and body is None:
            subject = unquote(m.group(1))
            versions = self.subjects.get(subject, [])
            n = len(versions) if m.group(2) == "latest" else int(m.group(2))
            if not versions or not 1 <= n <= len(versions):
                self._reply(h, 404, {"error_code": 40402, "message": "Version not found"})
                return
            self._reply(h, 200, self._version(subject, versions[n - 1], n))
            return
        m = re.fullmatch(r"/subjects/([^/]+)", path)
        if m and body is not None:
            subject = unquote(m.group(1))
            doc = json.loads(body)
            record = {"schema": doc["schema"], "schemaType": doc.get("schemaType", "AVRO"),
                      "references": doc.get("references") or []}
            for n, sid in enumerate(self.subjects.get(subject, []), 1):
                if self.schemas[sid] == record:
                    self._reply(h, 200, self._version(subject, sid, n))
                    return
            self._reply(h, 404, not_found)
            return
        self._reply(h, 404, {"error_code": 404, "message": f"not here: {path}"})
