"""The experiments' configurations saved as ``config.json`` next to their results (one mixin for all)."""

from __future__ import annotations

import dataclasses
import json


class JsonConfig:
    """``to_json`` / ``from_json`` for a frozen dataclass whose fields are JSON values (tuples become lists).

    Example:
        >>> @dataclasses.dataclass(frozen=True)
        ... class C(JsonConfig):
        ...     seeds: tuple[int, ...] = (0, 1)
        >>> C.from_json(C(seeds=(3,)).to_json())
        C(seeds=[3])
    """

    def to_json(self) -> str:
        """The configuration as JSON (tuples become lists)."""
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str):
        """Inverse of :meth:`to_json` (the dataclass's own checks run on the loaded fields)."""
        return cls(**json.loads(text))
