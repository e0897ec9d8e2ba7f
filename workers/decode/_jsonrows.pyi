# The native JSON record reader (workers/decode/_jsonrows.cpp).
from typing import Any

def rows(values: list[bytes | None], keys: list[bytes | None] | None, names: tuple[str, ...], id_field: str,
         max_id: int, out: Any) -> tuple[list[str | None], list[int]]: ...
