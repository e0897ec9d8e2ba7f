"""requirements.lock against pyproject.toml and the Dockerfile, offline.

`make lock-check` is the full check (it resolves again on PyPI and diffs); this one needs no network: every
runtime requirement ([project].dependencies and the `compiled`, `tracing` and `iceberg` extras the image installs) is pinned in the lock
at a version its specifier allows, every pin carries a hash, nothing of the test extra leaks in, and the
Dockerfile installs from the lock with hash checking.
"""

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def pins() -> dict[str, tuple[str, list[str]]]:
    text = open("requirements.lock").read().replace("\\\n", " ")
    found = {}
    for line in text.splitlines():
        match = re.match(r"([A-Za-z0-9._-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)\s*$", line)
        if match:
            found[canonicalize_name(match[1])] = (match[2], match[3].split())
        else:
            assert not line.strip() or line.lstrip().startswith("#"), f"unexpected line in requirements.lock: {line}"
    return found


def test_every_runtime_requirement_is_pinned_with_hashes_at_an_allowed_version():
    project = tomllib.load(open("pyproject.toml", "rb"))["project"]
    extras = project["optional-dependencies"]
    runtime = [Requirement(r) for r in project["dependencies"] + extras["compiled"] + extras["tracing"] + extras["iceberg"]]
    locked = pins()
    for req in runtime:
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is missing from requirements.lock: run `make lock`"
        version, hashes = locked[name]
        assert req.specifier.contains(version, prereleases=True), f"{req} but the lock pins {version}: `make lock`"
    assert all(hashes for _, hashes in locked.values()), "a pin without --hash: regenerate with `make lock`"
    test_only = {canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"]["test"]}
    test_only -= {canonicalize_name(r.name) for r in runtime} | {"scoring-workers"}
    assert not test_only & locked.keys(), "test-only packages in the image's lock"


def test_the_image_installs_from_the_lock_with_hashes_and_the_package_without_deps():
    dockerfile = open("Dockerfile").read()
    assert re.search(r"pip install [^\n]*--require-hashes[^\n]*-r requirements\.lock", dockerfile)
    assert re.search(r"pip install [^\n]*--no-deps \.", dockerfile)
    assert not re.search(r'pip install [^\n]*"\.\[', dockerfile), "the image installs the package with its deps"
