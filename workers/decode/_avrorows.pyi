# The native reader of flat Avro records (workers/decode/_avrorows.cpp).
from collections.abc import Sequence
from typing import Any

def rows(values: Sequence[bytes | None], programs: dict[bytes, tuple[int, ...]], keys: list[bytes | None] | None,
         width: int, max_id: int, out: Any) -> tuple[list[str | None], list[int]]: ...
