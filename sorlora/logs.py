"""Library log records that say nothing to the user, dropped where they arise: one filter, named by its text."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

__all__ = ["dropping"]


class _Drop(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg)


@contextlib.contextmanager
def dropping(logger_name: str, text: str) -> Iterator[None]:
    """Within the block, logger ``logger_name`` drops every record whose message contains ``text``."""
    logger, drop = logging.getLogger(logger_name), _Drop(text)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
