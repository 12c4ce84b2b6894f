"""The in-memory sample every part of fcit consumes, whatever file it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

IMAGE_TAG = "<image>"


@dataclass(frozen=True)
class Sample:
    """One instruction sample: a training record (first human/gpt turn) or a test record.

    ``prompt`` is the first user instruction with the ``<image>`` tag and surrounding white space removed; the model
    code re-inserts the image where its chat template wants it. ``refs`` holds every reference answer (captions have
    several; other datasets one, equal to ``answer``). ``meta`` keeps dataset-specific fields such as ``answer_bbox``
    and ``size`` for grounding.
    """

    dataset: str
    id: str
    image: Optional[str]  # absolute path, or None for a text-only record
    prompt: str
    answer: str
    refs: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


def strip_image_tag(text: str) -> str:
    return text.replace(IMAGE_TAG, "").strip()
