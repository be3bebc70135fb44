"""Offline checks of a card before it is written or pushed, in the spirit of ``ModelCard.validate`` (which needs the Hub).

They catch what would make a card useless on the Hub: metadata that does not parse, a missing base model or library,
an unknown base-model relation, a damaged or missing generated section, a loading snippet that is not valid Python.
"""

from __future__ import annotations

import ast
import re
from typing import Literal

from huggingface_hub import ModelCard

from model_cards.sections import parse_sections

__all__ = ["BASE_MODEL_RELATIONS", "REQUIRED_SECTIONS", "check_card", "extract_python_snippets"]

# The values the Hub accepts for `base_model_relation`.
BASE_MODEL_RELATIONS = frozenset({"adapter", "merge", "quantized", "finetune"})
REQUIRED_SECTIONS: dict[str, tuple[str, ...]] = {
    "adapter": ("header", "usage", "peer", "config", "rounds", "metrics", "citation"),
    "moe": ("header", "usage", "experts", "router", "results", "communication", "citation"),
}
_LIBRARY = {"adapter": "peft", "moe": "transformers"}
_PYTHON_BLOCK_RE = re.compile(r"^```python[ \t]*\r?\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def extract_python_snippets(text: str) -> list[str]:
    """The contents of the ```python fenced blocks of a card's text, in order."""
    return [match.group(1) for match in _PYTHON_BLOCK_RE.finditer(text)]


def check_card(card_or_text: ModelCard | str, *, kind: Literal["adapter", "moe"]) -> ModelCard:
    """Check a card of the given kind offline and return it parsed; raise ValueError listing every problem found."""
    if kind not in REQUIRED_SECTIONS:
        raise ValueError(f"Unknown card kind {kind!r}; expected one of {sorted(REQUIRED_SECTIONS)}.")
    text = str(card_or_text)
    try:
        card = ModelCard(text)  # parses the YAML block and the model-index
    except Exception as error:
        raise ValueError(f"Card metadata does not parse: {error}") from error

    problems: list[str] = []
    data = card.data
    if not text.lstrip().startswith("---"):
        problems.append("no YAML metadata block")
    if not data.base_model:
        problems.append("metadata lacks `base_model`")
    relation = data.get("base_model_relation")
    if relation not in BASE_MODEL_RELATIONS:
        problems.append(f"`base_model_relation` is {relation!r}, expected one of {sorted(BASE_MODEL_RELATIONS)}")
    if data.library_name != _LIBRARY[kind]:
        problems.append(f"`library_name` is {data.library_name!r}, expected {_LIBRARY[kind]!r}")
    tags = data.tags or []
    if not all(isinstance(tag, str) for tag in tags):
        problems.append("`tags` must be a list of strings")
    elif "solora" not in tags:
        problems.append("tags lack 'solora'")

    try:
        sections = {section.name: section for section in parse_sections(card.text)}
    except ValueError as error:
        problems.append(str(error))
        sections = {}
    else:
        missing = [name for name in REQUIRED_SECTIONS[kind] if name not in sections]
        if missing:
            problems.append(f"missing generated section(s): {', '.join(missing)}")
    if kind == "moe":
        # A results table must be mirrored in model-index; a card saved before evaluation has neither.
        results = sections.get("results")
        has_table = results is None or any(line.lstrip().startswith("|") for line in results.body.splitlines())
        if has_table and not data.eval_results:
            problems.append("metadata lacks `model-index` eval results")
        if not has_table and data.eval_results:
            problems.append("`model-index` has eval results but the results section shows no table")
    if "usage" in sections:
        snippets = extract_python_snippets(sections["usage"].body)
        if not snippets:
            problems.append("the usage section has no ```python snippet")
        for snippet in snippets:
            try:
                ast.parse(snippet)
            except SyntaxError as error:
                problems.append(f"the usage snippet is not valid Python: {error}")
    if problems:
        raise ValueError("Invalid model card: " + "; ".join(problems) + ".")
    return card
