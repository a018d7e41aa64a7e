"""Edits one field of a JSON-like document (tests that break manifests field by field)."""
from __future__ import annotations

from typing import Any, Sequence

#: The value that deletes the field instead of setting it.
DELETE = object()


def set_path(doc: Any, path: Sequence[Any], value: Any) -> None:
    """Sets (or, with :data:`DELETE`, removes) ``doc[path[0]][path[1]]...`` in place."""
    *parents, last = path
    for k in parents:
        doc = doc[k]
    if value is DELETE:
        del doc[last]
    else:
        doc[last] = value
