"""The fault suite: real broker, real PostgreSQL, several worker processes. Run alone: `make faults`."""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "/faults/" in str(item.fspath):
            item.add_marker(pytest.mark.faults)
