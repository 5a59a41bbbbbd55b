"""From records to model inputs: the item a text becomes, texts cut to the model's length, and
batches (images stacked once each, tokens padded) in an order that groups one image's examples."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from vtfuse.data.jsonl import Record
from vtfuse.data.tokenizer import Tokenizer

Item = tuple[list[int], int | None]  # token ids, and the answer class (VQA) or None


class TextTruncated(UserWarning):
    """Texts longer than the model's text.max_length tokens were cut to fit."""


@dataclass
class Truncation:
    """Cuts token sequences to the model's `max_length`, counting the texts cut and where the
    first came from, for one summary warning instead of one per line."""

    max_length: int
    count: int = 0
    first: str = ""

    def fit(self, ids: list[int], limit: int, where: str) -> list[int]:
        """`ids` cut to `limit` tokens (`max_length`, less the positions the model adds)."""
        if len(ids) > limit:
            self.count += 1
            self.first = self.first or where
        return ids[:limit]

    def where(self, record: Record) -> str:
        return record.where

    def warn(self, texts: str = "text") -> None:
        """One warning, if any text was cut: how many, and the first's file:line."""
        if self.count:
            warnings.warn(
                f"{self.count} {texts}(s) longer than the model's text.max_length of "
                f"{self.max_length} tokens truncated to fit (the first: {self.first})",
                TextTruncated,
                stacklevel=2,
            )


def encoder_view(tokens: Tensor, token_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Batched caption items (`tasks.caption.caption_items`: <bos> words <eos> <pad>...) as an
    encoder reads them (`tasks.retrieval.retrieval_items`: the words, a slot left for [CLS]):
    <bos> dropped, <eos> masked out as padding → tokens (B, T - 1) and token_mask. vtfuse's
    word vocabulary."""
    if token_mask is None:
        token_mask = tokens != Tokenizer.pad_id
    words = tokens[:, 1:]
    return words, token_mask[:, 1:] & (words != Tokenizer.eos_id)


def grouped_order(
    image_ids: list[int], generator: torch.Generator, per_group: int = 0
) -> list[int]:
    """A shuffled order of examples in groups of one image's examples, at most `per_group` a
    group (0: all of them), so a batch encodes each of its images once however many of its
    questions or captions it holds.

    Why cap the groups: a batch of 64 questions drawn 20 to an image shows the vision encoder
    3 images a step, and its gradient is that noisy. Measured (VQA from scratch on 9800
    Sort-of-CLEVR images, default model, 10 minutes on one core, seed 0; issue 15's note):
    whole groups learned place (0.99) but shape stalled at 0.60 (overall 0.66); groups of 4
    (16 images a batch, 1.4× the time a step) learned shape to 1.000 by step 3000, overall
    0.85; examples shuffled one by one (64 images a step, 3.6× the time) reached 0.59."""
    if per_group < 0:
        raise ValueError(f"examples_per_image must be 0 (all) or more, got {per_group}")
    by_image: dict[int, list[int]] = {}
    for example, image_id in enumerate(image_ids):
        by_image.setdefault(image_id, []).append(example)
    groups: list[list[int]] = []
    for examples in by_image.values():
        permutation = torch.randperm(len(examples), generator=generator).tolist()
        shuffled = [examples[j] for j in permutation]
        size = per_group or len(shuffled)
        groups += [shuffled[i : i + size] for i in range(0, len(shuffled), size)]
    shuffled_groups = torch.randperm(len(groups), generator=generator).tolist()
    return [example for g in shuffled_groups for example in groups[g]]


def pad_tokens(sequences: list[Tensor] | list[list[int]]) -> tuple[Tensor, Tensor]:
    """Right-pad token sequences with 0 → tokens (B, T) and token_mask (B, T), True on the
    sequences' own tokens (0 is <pad> in vtfuse's vocabulary, a real token in an LM's)."""
    tokens = torch.zeros(len(sequences), max(len(s) for s in sequences), dtype=torch.long)
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence)] = torch.as_tensor(sequence)
        mask[row, : len(sequence)] = True
    return tokens, mask


def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack each distinct image (or clip) once (`images`, (I, 3, H, W) or (I, frames, 3, H,
    W), with `image_index` mapping every example to its image's row and `image_ids` naming each
    row's image in the bank); right-pad token sequences
    with 0 (<pad>) and add `token_mask`."""
    rows: dict[int, int] = {}
    for item in items:
        rows.setdefault(item["image_id"], len(rows))
    firsts = {item["image_id"]: item["images"] for item in reversed(items)}
    batch = {
        "images": torch.stack([firsts[image_id] for image_id in rows]),
        "image_index": torch.tensor([rows[item["image_id"]] for item in items]),
        "image_ids": torch.tensor(list(rows)),  # each image row's id in the bank
    }
    batch["tokens"], batch["token_mask"] = pad_tokens([item["tokens"] for item in items])
    if "answers" in items[0]:
        batch["answers"] = torch.stack([it["answers"] for it in items])
    return batch
