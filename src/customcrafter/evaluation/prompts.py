"""The project's evaluation prompt set (packaged ``prompts.yaml``) and how a template becomes a prompt.

Ten prompts per kind of subject (``live`` / ``object``), as in the paper's protocol, split into ``motion`` prompts
(movement or interaction: the paper's claim is that CustomCrafter keeps motion) and ``static`` prompts. A prompt's
``index`` is its position in ``motion + static``; sampling writes it to the manifest as ``prompt_index`` so that
results from different methods line up prompt by prompt.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import yaml

__all__ = ["EvalPrompt", "evaluation_prompts", "format_prompt", "pluralize", "SUBJECT_PLACEHOLDER"]

SUBJECT_PLACEHOLDER = "{subject}"
PromptKind = Literal["live", "object"]
PromptType = Literal["motion", "static"]
_PROMPT_TYPES: tuple[PromptType, ...] = ("motion", "static")


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt: ``template`` holds ``{subject}``; ``type`` is ``"motion"`` or ``"static"``."""

    template: str
    type: PromptType
    index: int


@functools.cache
def _load_prompt_file() -> dict:
    text = resources.files("customcrafter.evaluation").joinpath("prompts.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    for kind in ("live", "object"):
        section = data.get(kind) if isinstance(data, dict) else None
        if not isinstance(section, dict) or set(section) != set(_PROMPT_TYPES):
            raise ValueError(
                f"customcrafter/evaluation/prompts.yaml: {kind!r} must have exactly motion and static lists"
            )
        for ptype in _PROMPT_TYPES:
            for template in section[ptype]:
                if not isinstance(template, str) or SUBJECT_PLACEHOLDER not in template:
                    raise ValueError(
                        f"customcrafter/evaluation/prompts.yaml: {kind}.{ptype}: {template!r} lacks "
                        f"{SUBJECT_PLACEHOLDER}"
                    )
    return data


def evaluation_prompts(kind: PromptKind) -> list[EvalPrompt]:
    """The evaluation prompts for a ``"live"`` or ``"object"`` subject, motion prompts first."""
    if kind not in ("live", "object"):
        raise ValueError(f"kind must be 'live' or 'object', got {kind!r}")
    section = _load_prompt_file()[kind]
    templates = [(t, ptype) for ptype in _PROMPT_TYPES for t in section[ptype]]
    return [EvalPrompt(template=t, type=ptype, index=i) for i, (t, ptype) in enumerate(templates)]


def pluralize(word: str) -> str:
    """English plural of a class word (enough for class nouns: dog→dogs, box→boxes, puppy→puppies).

    A multi-word class ("teddy bear") pluralises its last word; a word that already ends in "s" is left as is
    ("sunglasses").
    """
    head, _, last = word.rpartition(" ")
    lower = last.lower()
    if not last or lower.endswith("s") and not lower.endswith(("ss", "us")):
        plural = last
    elif lower.endswith(("ss", "us", "x", "z", "ch", "sh")):
        plural = last + "es"
    elif lower.endswith("y") and len(lower) > 1 and lower[-2] not in "aeiou":
        plural = last[:-1] + "ies"
    else:
        plural = last + "s"
    return f"{head} {plural}" if head else plural


def format_prompt(template: str, token: str, class_word: str) -> str:
    """Fill ``{subject}`` with ``"<token> <class_word>"`` (``{subject}s`` with the plural class word).

    An empty ``token`` gives the plain class prompt (the base model without customisation, or CLIP-T's text).

    >>> format_prompt("{subject} is walking", "<new1>", "dog")
    '<new1> dog is walking'
    >>> format_prompt("two {subject}s on a table", "<new1>", "box")
    'two <new1> boxes on a table'
    """
    if SUBJECT_PLACEHOLDER not in template:
        raise ValueError(f"prompt template {template!r} has no {SUBJECT_PLACEHOLDER} placeholder")
    prefix = f"{token.strip()} " if token and token.strip() else ""
    plural_pattern = re.escape(SUBJECT_PLACEHOLDER) + r"s\b"
    text = re.sub(plural_pattern, lambda _: prefix + pluralize(class_word.strip()), template)
    return text.replace(SUBJECT_PLACEHOLDER, prefix + class_word.strip())
