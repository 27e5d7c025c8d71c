# SPDX-License-Identifier: GPL-2.0-only
"""Key material that cannot leak by accident: `Secret`'s repr/str never show the bytes, so an
SA holding one can be logged, printed or put in an exception message without leaking its key.
Comparison is constant-time (hmac.compare_digest); pickling is refused."""

from __future__ import annotations

import hmac


class Secret:
    """Bytes that never show themselves in repr(), str() or f-strings. `reveal()` gets them."""

    __slots__ = ("_b",)

    def __init__(self, data: bytes = b"") -> None:
        self._b = bytes(data)

    def reveal(self) -> bytes:
        return self._b

    def __len__(self) -> int:
        return len(self._b)

    def __bool__(self) -> bool:
        return bool(self._b)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Secret):
            return hmac.compare_digest(self._b, other._b)
        if isinstance(other, bytes | bytearray):
            return hmac.compare_digest(self._b, bytes(other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(("Secret", len(self._b)))

    def __repr__(self) -> str:
        return f"<secret {len(self._b)} bytes>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __reduce__(self):  # pickling would be a way out of the box
        raise TypeError("Secret cannot be pickled")

    def __deepcopy__(self, memo: dict) -> Secret:
        return self
