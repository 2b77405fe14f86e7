"""A label as text (a file list's line, a shard's ``.cls`` member): one rule, and its bound.

A label is a class index written as a plain non-negative decimal integer: ASCII digits only
(leading zeros allowed, ``0007`` is 7), no sign, point, exponent or space inside; whitespace
around it is dropped. ``str.isdigit`` is not that rule: it accepts ``²`` (which ``int`` refuses)
and ``٣`` (which ``int`` reads as 3), so ``int`` alone would read text that is no class index.

The bound: a file list's or shards' class count is their largest label + 1, and a class count
sizes what is made per class (a classifier, per-class counts), so one stray label of 10^11
would ask for all memory. Labels are below ``MAX_CLASSES`` (2^24: 16,777,216, far above any
classification data set's classes); a model's class count, where one is known, bounds them
further (the data set's class count is compared with it).
"""

from __future__ import annotations

import re

from fastkd.errors import DatasetError

MAX_CLASSES = 1 << 24  # class indices are below this: 16,777,216
_DIGITS = re.compile(r"[0-9]+")  # ASCII only (re's \d would take every script's digits)
_SHOWN = 40  # characters of a bad label a message quotes


def parse_label(text: str, where: str) -> int:
    """The class index ``text`` holds; ``DatasetError`` naming ``where`` (``list.txt:12``,
    ``shard.tar:member``) and the text, unless it is a plain decimal below ``MAX_CLASSES``."""
    label = text.strip()
    shown = label if len(label) <= _SHOWN else f"{label[:_SHOWN]}..."
    if not _DIGITS.fullmatch(label):
        raise DatasetError(
            f"{where}: label {shown!r} is not a class index: write it as a plain decimal "
            f"integer in ASCII digits (0, 1, 2, ...; no sign, point or exponent), below "
            f"{MAX_CLASSES:,}"
        )
    significant = label.lstrip("0") or "0"  # int() of 4,300+ digits raises: the length first
    if len(significant) > len(str(MAX_CLASSES)) or int(significant) >= MAX_CLASSES:
        raise DatasetError(
            f"{where}: label {shown} is too large: class indices are below {MAX_CLASSES:,} "
            "(2^24), numbered 0, 1, 2, ... up to the number of classes - 1; fix the label"
        )
    return int(significant)
