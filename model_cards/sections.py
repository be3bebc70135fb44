"""Generated sections of a card and how a regenerated card is merged into an existing one.

A card this project writes is made of generated sections, each wrapped in HTML comment markers
(``<!-- sorlora:begin NAME -->`` ... ``<!-- sorlora:end NAME -->``), plus free text that belongs to the user. When the
card is regenerated (a new round was pushed, metrics changed), only the generated sections and the YAML metadata keys
the new card sets are replaced; everything else a user wrote on the Hub or on disk stays as it was.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

__all__ = [
    "CardSection",
    "begin_marker",
    "end_marker",
    "parse_sections",
    "update_card",
    "update_card_file",
    "write_card",
]

_NAME = r"[A-Za-z0-9_.-]+"
_MARKER_RE = re.compile(rf"<!--\s*sorlora:(begin|end)\s+({_NAME})\s*-->")


def begin_marker(name: str) -> str:
    """The comment that opens the generated section ``name``."""
    return f"<!-- sorlora:begin {name} -->"


def end_marker(name: str) -> str:
    """The comment that closes the generated section ``name``."""
    return f"<!-- sorlora:end {name} -->"


@dataclass(frozen=True)
class CardSection:
    """One generated section found in a card body: its name and the character span from begin to end marker."""

    name: str
    start: int  # index of the first character of the begin marker
    end: int  # index one past the last character of the end marker
    body: str  # text between the markers

    @property
    def text(self) -> str:
        """The section including its markers, as it appears in the card."""
        return f"{begin_marker(self.name)}{self.body}{end_marker(self.name)}"


def parse_sections(text: str) -> list[CardSection]:
    """Find the generated sections of a card body, in order.

    Raises ValueError when markers are unbalanced, nested, or a section name occurs twice, since merging a card whose
    markers were damaged would either drop user text or duplicate generated text.
    """
    sections: list[CardSection] = []
    seen: set[str] = set()
    open_name: str | None = None
    open_match: re.Match[str] | None = None
    for match in _MARKER_RE.finditer(text):
        kind, name = match.group(1), match.group(2)
        if kind == "begin":
            if open_name is not None:
                raise ValueError(
                    f"Card section {open_name!r} is not closed before section {name!r} begins "
                    f"(missing {end_marker(open_name)!r})."
                )
            if name in seen:
                raise ValueError(f"Card section {name!r} occurs more than once.")
            open_name, open_match = name, match
        else:
            if open_name is None or open_match is None:
                raise ValueError(f"Card has {end_marker(name)!r} without a matching {begin_marker(name)!r}.")
            if name != open_name:
                raise ValueError(f"Card section {open_name!r} is closed by the end marker of {name!r}.")
            sections.append(
                CardSection(
                    name=name, start=open_match.start(), end=match.end(), body=text[open_match.end() : match.start()]
                )
            )
            seen.add(name)
            open_name, open_match = None, None
    if open_name is not None:
        raise ValueError(f"Card section {open_name!r} is never closed (missing {end_marker(open_name)!r}).")
    return sections


def _as_card(card: ModelCard | str) -> ModelCard:
    if isinstance(card, ModelCard):
        return card
    if isinstance(card, str):
        return ModelCard(card)
    raise TypeError(f"Expected a huggingface_hub.ModelCard or card text, got {type(card).__name__}.")


def _normalized_lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]


# The descriptions libraries fill into huggingface_hub's default template on their own: none (PEFT's save_pretrained)
# and the sentence transformers' push_to_hub writes into a repo that has no card yet.
AUTO_DESCRIPTIONS: tuple[str, ...] = (
    "",
    "This is the model card of a 🤗 transformers model that has been pushed on the Hub. This model card has been "
    "automatically generated.",
)


def _is_untouched_default(body: str) -> bool:
    """True when ``body`` is huggingface_hub's default template as a library wrote it, with nothing a user added.

    PEFT's ``save_pretrained`` writes that template and appends a "Framework versions" block; transformers'
    ``push_to_hub`` fills in a generated one-line description. A regenerated card replaces such a body instead of
    keeping 200 lines of placeholders; any other description counts as the user's and is kept.
    """
    lines = [line for line in _normalized_lines(body) if not line.startswith("- PEFT ")]
    while lines and lines[-1] in ("", "### Framework versions"):
        lines.pop()
    for description in AUTO_DESCRIPTIONS:
        default = _normalized_lines(ModelCard.from_template(ModelCardData(), model_description=description).text)
        while default and default[-1] == "":
            default.pop()
        if lines == default:
            return True
    return False


def _merge_bodies(old_body: str, new_body: str) -> str:
    newline = "\n"
    if "\r\n" in old_body:  # keep a card edited on Windows in one line-ending style
        newline = "\r\n"
        new_body = new_body.replace("\r\n", "\n").replace("\n", newline)
    gap = newline * 2
    new_sections = parse_sections(new_body)
    if not new_sections:
        raise ValueError("The new card has no generated sections (<!-- sorlora:begin NAME --> markers) to merge.")
    old_sections = parse_sections(old_body)
    if not old_sections:
        # A card this project never wrote: keep what is there, below the generated card.
        if not old_body.strip() or _is_untouched_default(old_body):
            return new_body
        return new_body.rstrip("\r\n") + gap + old_body.lstrip("\r\n")

    new_by_name = {section.name: section for section in new_sections}
    new_order = [section.name for section in new_sections]
    old_names = {section.name for section in old_sections}

    def missing_after(name: str | None) -> list[str]:
        """New sections absent from the old card that follow ``name`` (or lead, for None) in the new card."""
        start = 0 if name is None else new_order.index(name) + 1
        out = []
        for candidate in new_order[start:]:
            if candidate in old_names:
                break
            out.append(candidate)
        return out

    pieces: list[str] = []
    cursor = 0
    first = True
    for section in old_sections:
        pieces.append(old_body[cursor : section.start])
        cursor = section.end
        if section.name not in new_by_name:
            continue  # a generated section the new card no longer has is stale: drop it
        if first:
            pieces.extend(new_by_name[name].text + gap for name in missing_after(None))
            first = False
        pieces.append(new_by_name[section.name].text)
        pieces.extend(gap + new_by_name[name].text for name in missing_after(section.name))
    if first:  # none of the old generated sections survives: put the new ones where the first old one was
        pieces.insert(1, gap.join(section.text for section in new_sections))
    pieces.append(old_body[cursor:])
    return "".join(pieces)


def update_card(existing_text: str | None, new_card: ModelCard | str) -> str:
    """Merge a freshly generated card into an existing card's text (None: there is none yet) and return the new text.

    Generated sections are replaced by the new card's (sections missing from the old card are inserted next to their
    neighbours, sections the new card no longer has are dropped); metadata keys the new card sets replace the old
    values, other keys (a license or language a user added) are kept; all text outside generated sections is kept.
    """
    new = _as_card(new_card)
    if existing_text is None:
        return str(new)
    try:
        old = ModelCard(existing_text)
    except Exception as error:  # yaml errors and the card's own ValueError
        raise ValueError(f"The existing card's YAML metadata cannot be parsed: {error}") from error
    merged_meta = old.data.to_dict()
    merged_meta.update(new.data.to_dict())
    try:
        old.data = ModelCardData(**merged_meta)
    except ValueError as error:
        raise ValueError(f"The merged card metadata is invalid: {error}") from error
    old.text = _merge_bodies(old.text, new.text)
    return str(old)


def write_card(card_or_text: ModelCard | str, path: str | os.PathLike[str]) -> ModelCard:
    """Write a card to ``path`` (a README.md) atomically and return it as a ModelCard.

    Text is parsed first, so a card whose metadata does not parse is never written.
    """
    card = _as_card(card_or_text)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".README.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(str(card))
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return card


def update_card_file(path: str | os.PathLike[str], new_card: ModelCard | str) -> ModelCard:
    """Write ``new_card`` to ``path``, merged into the card already there (see :func:`update_card`), and return it."""
    target = Path(path)
    existing = None
    if target.is_file():
        with target.open(encoding="utf-8-sig", newline="") as handle:  # newline="": keep the file's line endings
            existing = handle.read()
    return write_card(update_card(existing, new_card), target)
