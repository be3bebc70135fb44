"""What the libraries beneath the CLI print: only what tells the user something, each thing silenced where it arises.

- ``--no-progress`` silences every bar: transformers' and huggingface_hub's (weight loading, downloads) and the bare
  tqdm that transformers' GGUF loader draws while de-quantizing (``modeling_gguf_pytorch_utils`` imports tqdm
  itself, so the libraries' switches miss it);
- a hub's retries of a transient failure (``sorlora_gossip.hub.hf``: one warning per retry) are not shown: the
  request either succeeds or ends, after its retries, in one error line (``-v`` shows every retry);
- warnings the run triggers by design are hidden (:func:`quiet_library_warnings`: adapters share one base model,
  PEFT asks transformers a deprecated question, GGUF weights are dequantized);
- no look-up of the public Hub when the hub is another endpoint (a lab's ``sorlora hub-serve``): huggingface_hub's
  first request fetched a registry of "agent harnesses" from huggingface.co to fill its telemetry user-agent (a DNS
  query from an offline lab): with another endpoint telemetry is off for the command (:func:`no_public_lookups`);
  PEFT's look-up of the base's ``config.json`` whenever a peer saves its adapter is not made at all (see
  ``sorlora.protocol.publish``: ``save_embedding_layers=False``).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator

from ..logs import dropping

__all__ = ["PUBLIC_HUB", "no_library_progress_bars", "no_public_lookups", "quiet_hub_retries", "quiet_library_warnings"]

PUBLIC_HUB = "https://huggingface.co"


def quiet_library_warnings() -> None:
    """Hide warnings a run or study triggers by design: adapters share one base model (PEFT's renamed
    ``base_model_name_or_path``, "Already unmerged"), PEFT's ``is_gradient_checkpointing`` look-up that transformers
    deprecated, GGUF weights dequantized without a config file."""
    for pattern in (
        ".*base_model_name_or_path.*was renamed.*",
        ".*is_gradient_checkpointing.*",
        ".*Could not find a config file.*",
        ".*Already unmerged.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def no_library_progress_bars() -> None:
    """Silence the libraries' progress bars (transformers, huggingface_hub, the GGUF de-quantizing bar)."""
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf
    except ImportError:  # a transformers without GGUF support draws no GGUF bar
        return
    if not isinstance(gguf.tqdm, functools.partial):
        gguf.tqdm = functools.partial(gguf.tqdm, disable=True)


@contextlib.contextmanager
def quiet_hub_retries() -> Iterator[None]:
    """Within the block, drop the HTTP hub's per-retry warnings (the final failure is still one error line)."""
    with dropping("sorlora_gossip.hub.hf", "transient error"):
        yield


@contextlib.contextmanager
def no_public_lookups(location: object) -> Iterator[None]:
    """Within the block, huggingface_hub sends no telemetry (and so looks nothing up on the public Hub) when
    ``location`` is an HTTP hub other than the public Hub; any other location changes nothing."""
    text = str(location or "").rstrip("/")
    if not text.startswith(("http://", "https://")) or text == PUBLIC_HUB:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_DISABLE_TELEMETRY
    constants.HF_HUB_DISABLE_TELEMETRY = True
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_TELEMETRY = before
