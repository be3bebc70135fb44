"""Make ``solora`` a PEFT method: add ``PeftType.SOLORA`` to PEFT's closed enum, then register config and model.

PEFT has no plugin discovery, so this runs on ``import peft_sorlora``; it is idempotent.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

__all__ = ["SOLORA", "register"]

_NAME = "SOLORA"


def _add_enum_member() -> PeftType:
    if _NAME in PeftType.__members__:
        return PeftType[_NAME]
    member = str.__new__(PeftType, _NAME)
    member._name_ = _NAME
    member._value_ = _NAME
    PeftType._member_map_[_NAME] = member
    PeftType._value2member_map_[_NAME] = member
    PeftType._member_names_.append(_NAME)
    type.__setattr__(PeftType, _NAME, member)
    return member


SOLORA = _add_enum_member()


def register(config_cls: type, model_cls: type) -> None:
    """Register the method with PEFT once (a second call is a no-op)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    if SOLORA in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    register_peft_method(name="solora", config_cls=config_cls, model_cls=model_cls, prefix="solora_")
