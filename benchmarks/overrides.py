"""``key=value`` config overrides on a benchmark's command line (values as Python literals, else strings)."""
import ast
from typing import Any, Iterable


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["sparsity=0.98", "prune_scope=lamp"]`` -> ``{"sparsity": 0.98, "prune_scope": "lamp"}``."""
    values = {}
    for item in items:
        key, _, text = item.partition("=")
        try:
            values[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            values[key] = text
    return values
