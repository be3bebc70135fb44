"""Hub model cards for the repos this project writes: one per peer adapter, one for the merged implicit-MoE model.

A leaf package: it takes plain data (dataclasses, dicts) and returns ``huggingface_hub.ModelCard`` objects rendered
from the Jinja templates in ``model_cards/templates``. Regenerating a card replaces only its generated sections and
metadata, so text users add on the Hub survives every push.
"""

from model_cards.adapter import AdapterCardInfo, RoundRecord, adapter_card, summarize_config
from model_cards.moe import ExpertInfo, MoECardInfo, moe_card
from model_cards.publish import push_with_card
from model_cards.sections import parse_sections, update_card, update_card_file, write_card
from model_cards.validate import check_card, extract_python_snippets

__all__ = [
    "AdapterCardInfo",
    "ExpertInfo",
    "MoECardInfo",
    "RoundRecord",
    "adapter_card",
    "check_card",
    "extract_python_snippets",
    "moe_card",
    "parse_sections",
    "push_with_card",
    "summarize_config",
    "update_card",
    "update_card_file",
    "write_card",
]
