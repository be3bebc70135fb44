"""Publishing a saved model with its card in one commit, through ``huggingface_hub``'s public API only.

Used by ``PeftModel.push_to_hub`` of SO-LoRA adapters (:mod:`peft_sorlora.hub`) and by the implicit MoE's
``push_to_hub`` (:mod:`moe_router.modeling`): the repo's current ``README.md`` is put into a fresh folder first, so
the card the ``save`` callback merges into it keeps what users wrote on the Hub.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

__all__ = ["push_with_card", "CARD_FILE"]

CARD_FILE = "README.md"


def push_with_card(
    repo_id: str,
    save: Callable[[str, str], None],
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
) -> Any:
    """Create ``repo_id`` if needed, call ``save(folder, repo_id)`` on a folder that holds the repo's current
    README.md (if any), and upload the folder as one commit; returns the ``CommitInfo``.

    ``repo_id`` passed to ``save`` is the normalised one (``create_repo`` adds the namespace); cards name it.
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        try:
            existing = hf_hub_download(repo_id, CARD_FILE, revision=revision, token=token)
            shutil.copyfile(existing, os.path.join(folder, CARD_FILE))
        except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
            pass
        save(folder, repo_id)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or "Upload model",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )
