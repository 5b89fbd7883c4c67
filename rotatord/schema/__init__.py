"""The published JSON Schema of the secret document, checked on every read.

``document-v1.schema.json`` is what bots in any language can validate against; rotatord checks
each document it reads with it (when ``jsonschema`` is installed: always for the daemon, optional
for bots importing ``rotatord.client``) before its own stricter parse.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

__all__ = ["load_schema", "schema_problem"]


@cache
def load_schema() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(resources.files(__name__).joinpath("document-v1.schema.json").read_text())
    return data


@cache
def _validator() -> Any:
    try:
        import jsonschema
    except ImportError:  # a bot without jsonschema still gets rotatord.document's own checks
        return None
    return jsonschema.Draft202012Validator(load_schema())


def schema_problem(data: Any) -> str | None:
    """Where ``data`` breaks the schema (a JSON path and the rule), or None.  Never echoes values:
    a document holds key material."""
    validator = _validator()
    if validator is None:
        return None
    error = next(iter(validator.iter_errors(data)), None)
    if error is None:
        return None
    return f"does not match the document schema at {error.json_path} (rule {error.validator!r})"
