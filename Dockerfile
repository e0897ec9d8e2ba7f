# scoring-worker container image.
#   docker build -t scoring-workers .            (or: buildah bud --isolation chroot -t scoring-workers .)
# The base is a build argument; it must be Debian bookworm or compatible (python3 is 3.11 there).
ARG BASE_IMAGE=debian:bookworm-slim

# ---- build: a virtualenv with the package and its wheels, byte-compiled --------------------------
FROM ${BASE_IMAGE} AS build
# g++ and the Python headers build the package's native JSON record reader (workers/decode/_jsonrows.cpp);
# they stay in this stage.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# CA bundle pip trusts. Behind a TLS-intercepting proxy, mount the host's bundle somewhere else
# (e.g. -v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro) and pass --build-arg PIP_CERT=/run/host-ca.crt.
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=${PIP_CERT}
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --quiet --upgrade pip
WORKDIR /src
# The runtime dependencies (with the `compiled`, `tracing` and `iceberg` extras) come from requirements.lock, every version pinned and
# hash-checked, so two builds months apart install the same wheels (`make lock` regenerates it). The package
# itself goes in with --no-deps, and `pip check` fails the build if the lock no longer satisfies it.
COPY requirements.lock ./
RUN /opt/venv/bin/pip install --quiet --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY workers ./workers
RUN /opt/venv/bin/pip install --quiet --no-deps . \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/pip uninstall --quiet --yes pip \
 # The root filesystem is read-only at run time: compile bytecode now, not on every start.
 && /opt/venv/bin/python -m compileall -q /opt/venv \
 && find /opt/venv -name '*.dist-info' -path '*/tests/*' -prune -o -type d -name tests -prune -exec rm -rf {} +

# ---- runtime: python, libgomp (LightGBM's OpenMP), the venv; no compilers, no caches, non-root ----
# OpenShift (restricted-v2 SCC) runs the container under an arbitrary UID whose group is 0 (root group, no root
# privileges), with no passwd entry; other restricted clusters keep the image's 10001 (in group 0 too). Nothing
# needs a named user: HOME, TMPDIR and every cache point at /tmp (an emptyDir or tmpfs; the root filesystem is
# read-only), the venv is world-readable, and a worker in group 0 writes group-writable files (scoring-worker
# drops the group bits from its umask) so pods of different UIDs can share a cache or output volume.
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin scorer
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TMPDIR=/tmp
# Writes go only to /tmp (mount an emptyDir there) or a mounted volume.
WORKDIR /tmp
USER 10001:0
# 8080 REST (serve) or metrics (stream 9000), 8081 gRPC (serve, the Open Inference Protocol).
EXPOSE 8080 8081 9000
ENTRYPOINT ["scoring-worker"]
CMD ["--help"]
