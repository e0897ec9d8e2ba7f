"""Local and object-storage paths as pyarrow filesystems, chosen by URI scheme; canonical locations.

A *canonical location* is the one spelling of a place, so that two spellings of it compare equal:
``s3://bucket/key`` (no trailing or doubled slashes, ``.`` and ``..`` resolved) or an absolute local path
with ``..`` and symlinks resolved (``file://`` dropped). Batch mode names its outputs and its ledger entries
by the canonical location of each input, and refuses an output root that is, or contains, the input root.
"""

from __future__ import annotations

import os
import posixpath
from urllib.parse import urlparse

import pyarrow.fs as pafs

# One redaction for everything printed or logged (userinfo passwords and secret query parameters); re-exported
# here beside the other URI helpers.
from workers.settings import S3Settings, redact

__all__ = ["canonical", "inside", "is_s3", "output_name", "read_bytes", "redact", "resolve", "s3_filesystem"]


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


def canonical(uri: str) -> str:
    """The canonical location of a local path, ``file://`` or ``s3://`` URI (see the module docstring).

    A local path need not exist: the part that exists has its symlinks resolved, the rest is normalised.
    """
    if is_s3(uri):
        key = posixpath.normpath("/" + uri[len("s3://"):]).lstrip("/")  # also collapses '//' and drops a '/' end
        return "s3://" + key
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return os.path.realpath(os.path.abspath(uri or "."))


def inside(path: str, root: str) -> bool:
    """True when canonical ``path`` is ``root`` or below it (both canonical; local and s3:// never overlap)."""
    if root.endswith("/"):  # "/" or "s3://": everything on that filesystem
        return path.startswith(root)
    return path == root or path.startswith(root + "/")


def _escape(segment: str) -> str:
    # Readers of a dataset (pyarrow, Spark, DuckDB) skip names starting with '_' or '.': an input under
    # '/home/u/.data/' or '/work/_lake/' must not get invisible results. Percent-escape that first character
    # (and '%' itself, so the mapping stays one-to-one).
    segment = segment.replace("%", "%25")
    if segment[:1] in ("_", "."):
        segment = f"%{ord(segment[0]):02X}{segment[1:]}"
    return segment


def output_name(unit: str) -> str:
    """The relative name under an output root for a unit: a canonical input location loses its scheme (or its
    leading '/'), each segment is escaped so no name is hidden; other units (stream slices) are kept as they are
    apart from that escaping. Different canonical locations map to different names, except a local path and an
    S3 key spelled the same (``/b/k`` and ``s3://b/k``), which the Parquet ledger tells apart."""
    bare = unit[len("s3://"):] if is_s3(unit) else unit
    return "/".join(_escape(seg) for seg in bare.split("/") if seg)
