"""Plain-text corpora for language models: read sentences from a file, tokenize them in batches.

A text file holds one sentence (or short passage) per line; blank lines are skipped and repeated
lines are kept once, in their first order. Batches are the tokenizer's output as a plain ``dict``
of tensors (``input_ids``, ``attention_mask``, ...), padded to the longest item of the batch, so
they can be passed as calibration or distillation batches anywhere in secateur.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from ..errors import DatasetError


def read_sentences(path: str | os.PathLike[str]) -> list[str]:
    """The non-blank lines of the UTF-8 text file at ``path``, stripped, first occurrences only.

    Raises:
        DatasetError: one line, for a missing or unreadable file, one that is not UTF-8 text,
            or one with no non-blank line.
    """
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DatasetError(
            f"text file {source} is not UTF-8: convert it, e.g. iconv -t UTF-8"
        ) from None
    except OSError as exc:
        raise DatasetError(
            f"cannot read text file {source}: {exc.strerror or type(exc).__name__}: pass an "
            "existing file with one sentence per line"
        ) from None
    lines = list(dict.fromkeys(line.strip() for line in text.splitlines()))
    sentences = [line for line in lines if line]
    if not sentences:
        raise DatasetError(f"text file {source} has no sentence: write one sentence per line")
    return sentences


def tokenize_batches(
    tokenizer: Any,
    texts: list[str],
    batch_size: int,
    *,
    max_length: int = 128,
    by_length: bool = False,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """``texts`` tokenized into batches of at most ``batch_size``, truncated to ``max_length``.

    ``by_length=False`` keeps the text order. ``by_length=True`` groups texts of similar token
    length into the same batch and shuffles the batches with ``seed``: far fewer padding tokens,
    hence cheaper training steps, and every text is still in exactly one batch.
    """
    if by_length:
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: (len(ids[i]), i))
        texts = [texts[i] for i in order]
    groups = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    if by_length:
        random.Random(seed).shuffle(groups)
    return [
        dict(
            tokenizer(
                group, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
        )
        for group in groups
    ]
