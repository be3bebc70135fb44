"""SO-LoRA adapters on the Hub the way PEFT users expect: the project's adapter card on ``save_pretrained`` and
``push_to_hub`` (and ``print_trainable_parameters`` telling how many entries of B really train).

PEFT writes its placeholder card in ``PeftModel.save_pretrained``, and ``PeftModel.push_to_hub`` (transformers'
``PushToHubMixin``) overwrites whatever ``save_pretrained`` wrote with transformers' placeholder card. PEFT has no
hook for a method's card, so ``import peft_sorlora`` wraps these public ``PeftModel`` methods
(:func:`install`): for a model whose active adapter is SO-LoRA they write the :mod:`model_cards` adapter card (Hub
metadata ``library_name: peft``, ``base_model``, tags, and the "import peft_sorlora first" loading snippet), merged
into the README already in the folder or repo so user text survives; for every other model they are PEFT's own.

The card names the base model only by a portable Hub id: a local path (or a ``weights-sha256-...`` name of a local
folder) is never written into a card; such adapters keep PEFT's card, without the path.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

from huggingface_hub import ModelCard
from peft import PeftModel

from model_cards.publish import push_with_card

from ._registry import SOLORA
from .calibration import trainable_entries

__all__ = ["install", "portable_base_id", "adapter_card_for", "CARD_FILE"]

CARD_FILE = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_INSTALLED = "_peft_sorlora_original"


def portable_base_id(name: str | None) -> str | None:
    """``name`` if it is a Hub model id (``owner/name``), None for a local path or a local folder's fingerprint."""
    if not name or not isinstance(name, str) or os.path.isabs(name) or os.path.exists(name):
        return None
    if name.startswith("weights-sha256-") or not _HUB_ID.match(name) or ".." in name:
        return None
    return name


def _solora_config(model: PeftModel) -> Any | None:
    config = model.peft_config.get(model.active_adapter) if isinstance(model.active_adapter, str) else None
    return config if config is not None and config.peft_type == SOLORA else None


def adapter_card_for(model: PeftModel, repo_id: str, *, tags: list[str] | None = None) -> ModelCard | None:
    """The project's adapter card for ``model``'s active SO-LoRA adapter as repo ``repo_id``; None when it is not an
    SO-LoRA adapter or its base model has no portable Hub id."""
    import model_cards

    config = _solora_config(model)
    base = portable_base_id(getattr(config, "base_model_name_or_path", None)) if config is not None else None
    if base is None:
        return None
    kept = trainable_entries(model, model.active_adapter)[0] if config.layer_sparsity is not None else None
    info = model_cards.AdapterCardInfo(
        repo_id=repo_id,
        base_model=base,
        peer_id=None,
        task=None,
        config=config.to_dict(),
        params_updated=kept,
    )
    card = model_cards.adapter_card(info)
    if tags:
        card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *tags]))
    return card


def _create_or_update_model_card(original, self: PeftModel, output_dir: str) -> None:
    """PEFT's card for other methods; the project's adapter card (merged into an existing README) for SO-LoRA."""
    import model_cards

    repo_id = getattr(self, "_peft_sorlora_repo_id", None) or os.path.basename(os.path.normpath(str(output_dir)))
    card = adapter_card_for(self, repo_id, tags=getattr(self, "_peft_sorlora_tags", None))
    if card is None:
        original(self, output_dir)
        if _solora_config(self) is not None:
            _drop_local_base(os.path.join(output_dir, CARD_FILE))
        return
    model_cards.update_card_file(os.path.join(output_dir, CARD_FILE), card)


def _drop_local_base(path: str) -> None:
    """Remove a local path PEFT wrote as ``base_model`` (and its derived tag) from the card at ``path``."""
    if not os.path.isfile(path):
        return
    card = ModelCard.load(path)
    base = card.data.get("base_model")
    if base and portable_base_id(base) is None:
        card.data.base_model = None
        card.data.tags = [t for t in card.data.tags or [] if base not in t] or None
        card.save(path)


def _push_to_hub(
    original,
    self: PeftModel,
    repo_id: str,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
    **kwargs: Any,
):
    """transformers' ``push_to_hub`` for other methods; for SO-LoRA: save into a folder holding the repo's current
    README, merge the adapter card into it, upload the folder in one commit (:func:`model_cards.publish.push_with_card`).
    """
    if _solora_config(self) is None:
        return original(
            self,
            repo_id,
            commit_message=commit_message,
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
            tags=tags,
            **kwargs,
        )

    def save(folder: str, normalised_id: str) -> None:
        self._peft_sorlora_repo_id, self._peft_sorlora_tags = normalised_id, tags
        try:
            self.save_pretrained(folder, **{k: v for k, v in kwargs.items() if k != "max_shard_size"})
        finally:
            del self._peft_sorlora_repo_id, self._peft_sorlora_tags

    return push_with_card(
        repo_id,
        save,
        token=token,
        private=private,
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message or "Upload SO-LoRA adapter",
        commit_description=commit_description,
    )


def _print_trainable_parameters(original, self: PeftModel) -> None:
    """PEFT's line, plus, for SO-LoRA, how many entries of B really train (PEFT counts all of B)."""
    original(self)
    config = _solora_config(self)
    if config is not None:
        kept, total = trainable_entries(self, self.active_adapter)
        state = "masks frozen" if config.layer_sparsity is not None else "masks chosen by the first training batch(es)"
        print(f"SO-LoRA: {kept:,d} of the {total:,d} entries of B train ({100 * kept / max(total, 1):.2f}%; {state})")


_WRAPPERS = {
    "create_or_update_model_card": _create_or_update_model_card,
    "push_to_hub": _push_to_hub,
    "print_trainable_parameters": _print_trainable_parameters,
}


def install() -> None:
    """Wrap ``PeftModel``'s ``create_or_update_model_card``, ``push_to_hub`` and ``print_trainable_parameters`` once
    (idempotent); each wrapper is PEFT's own method for models whose active adapter is not SO-LoRA."""
    for name, wrapper in _WRAPPERS.items():
        current = getattr(PeftModel, name)
        if getattr(current, _INSTALLED, None) is not None:
            continue

        def method(self, *args, _wrapper=wrapper, _original=current, **kwargs):
            return _wrapper(_original, self, *args, **kwargs)

        functools.update_wrapper(method, current)
        setattr(method, _INSTALLED, current)
        setattr(PeftModel, name, method)
