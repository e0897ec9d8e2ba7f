"""Local and object-storage paths as pyarrow filesystems, chosen by URI scheme."""

from __future__ import annotations

from urllib.parse import urlparse

import pyarrow.fs as pafs

from workers.settings import S3Settings


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_filesystem(s3: S3Settings) -> pafs.S3FileSystem:
    kwargs: dict = {"region": s3.region}
    if s3.endpoint_url:
        parsed = urlparse(s3.endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    if s3.access_key_id:
        kwargs["access_key"] = s3.access_key_id
        kwargs["secret_key"] = s3.secret_access_key.get_secret_value() if s3.secret_access_key else ""
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, s3: S3Settings) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path inside it) for a local path, ``file://`` or ``s3://`` URI."""
    if is_s3(uri):
        return s3_filesystem(s3), uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return pafs.LocalFileSystem(), uri


def read_bytes(uri: str, s3: S3Settings) -> bytes:
    fs, path = resolve(uri, s3)
    with fs.open_input_stream(path) as f:
        return f.read()
