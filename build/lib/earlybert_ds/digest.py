"""One fingerprint for JSON-able data: what cache keys, tokenizer checks and ticket checks compare."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def json_digest(data: Any, chars: int | None = 16) -> str:
    """sha256 of ``data`` as canonical JSON (sorted keys), as hex; its first ``chars`` characters (all: ``None``)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:chars]
