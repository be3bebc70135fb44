"""What both card kinds share: the paper's citation, the templates' location, and value formatting for tables."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "ARXIV_ID",
    "BIBTEX",
    "CITATION_MARKDOWN",
    "BASE_TAGS",
    "TEMPLATES_DIR",
    "format_count",
    "format_bytes",
    "format_value",
    "python_literal",
    "tag_slug",
]

ARXIV_ID = "2602.20492"
BIBTEX = """@article{yang2026sorlora,
  title   = {Wireless Federated Multi-Task {LLM} Fine-Tuning via Sparse-and-Orthogonal {LoRA}},
  author  = {Yang, N. and Wang, S. and Huan, O. and Chen, M. and Quek, T. Q. S. and Yin, C.},
  journal = {arXiv preprint arXiv:2602.20492},
  year    = {2026}
}"""
CITATION_MARKDOWN = f"""## Citation

The method is described in "Wireless Federated Multi-Task LLM Fine-Tuning via Sparse-and-Orthogonal LoRA"
([arXiv:{ARXIV_ID}](https://arxiv.org/abs/{ARXIV_ID})).

```bibtex
{BIBTEX}
```"""
# Tags every card of this project carries; "arxiv:" makes the Hub link the paper page.
BASE_TAGS: tuple[str, ...] = ("solora", "decentralized-federated-learning", f"arxiv:{ARXIV_ID}")
TEMPLATES_DIR = Path(__file__).parent / "templates"


def python_literal(value: str) -> str:
    """A Python string literal for ``value``, so a rendered snippet names the real repo id or path verbatim."""
    return json.dumps(value)


def tag_slug(value: str) -> str:
    """``value`` as a Hub tag: lower case, spaces and slashes turned into dashes."""
    slug = "-".join(value.strip().lower().replace("/", " ").split())
    if not slug:
        raise ValueError(f"Cannot make a tag from {value!r}.")
    return slug


def format_count(value: int | float) -> str:
    """An integer count with thousands separators (``1234567`` -> ``1,234,567``)."""
    return f"{int(value):,}"


def format_bytes(value: int | float) -> str:
    """A byte count in binary units (``1536`` -> ``1.5 KiB``)."""
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(amount) < 1024 or unit == "GiB":
            return f"{int(amount)} B" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    raise AssertionError("unreachable")


def format_value(value: object) -> str:
    """A table cell: floats with 4 significant digits, collections comma-joined in sorted order, others as str."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (set, frozenset)):
        return ", ".join(sorted(str(item) for item in value))
    if isinstance(value, (list, tuple)):
        return ", ".join(str(item) for item in value)
    return str(value)


def unique(values: Iterable[str]) -> list[str]:
    """``values`` without duplicates, first occurrence kept."""
    return list(dict.fromkeys(values))
