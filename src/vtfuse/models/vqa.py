"""Visual question answering, and image+text pair classification: a text encoder whose blocks
cross-attend to the image tokens; the mean of its states is classified over the answers (or
labels) seen in training."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtfuse.config import ModelConfig
from vtfuse.encoders.text import FusedTextTransformer
from vtfuse.models import across_ranks
from vtfuse.models.base import TASKS, TaskModel

NO_ANSWER = -1  # an answer outside the answer vocabulary: not scored


class AnswerClassifier(TaskModel):
    """VQA as classification over the answers seen in training; `forward(images, tokens,
    token_mask, image_index)` gives the answer logits."""

    task = "vqa"

    def training_loss(self, batch: dict[str, Tensor], label_smoothing: float = 0.0) -> Tensor:
        logits, _ = self(
            batch["images"], batch["tokens"], batch["token_mask"], batch["image_index"]
        )
        return across_ranks.cross_entropy(
            logits,
            batch["answers"],
            ignore_index=NO_ANSWER,
            label_smoothing=label_smoothing,
            per_batch=batch.get("targets_per_batch"),
        )

    def scored_targets(self, batch: dict[str, Tensor]) -> Tensor:
        """The questions with an answer among the known ones."""
        return across_ranks.scored(batch["answers"], NO_ANSWER)

    def validation_metrics(self, batch: dict[str, Tensor]) -> dict[str, float]:
        logits, _ = self(
            batch["images"], batch["tokens"], batch["token_mask"], batch["image_index"]
        )
        loss = F.cross_entropy(logits, batch["answers"], ignore_index=NO_ANSWER)
        accuracy = (logits.argmax(-1) == batch["answers"]).float().mean()
        return {"loss": loss.item(), "accuracy": accuracy.item()}


def answer_head(dim: int, num_answers: int) -> nn.Sequential:
    if num_answers < 1:
        raise ValueError("a VQA model needs num_answers >= 1")
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, num_answers))


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean over the positions where `mask` (B, T) is True: (B, T, D) → (B, D)."""
    keep = mask[:, :, None].to(hidden.dtype)
    return (hidden * keep).sum(1) / keep.sum(1)


def read_with_cls(
    text: FusedTextTransformer,
    cls: Tensor,
    tokens: Tensor,
    token_mask: Tensor | None,
    image: Tensor | None,
    image_index: Tensor | None = None,
    need_weights: bool = False,
) -> tuple[Tensor, list[Tensor]]:
    """A bidirectional reading of the words with a learned [CLS] (1, 1, D) in front: the mean
    state over [CLS] and the words (B, D), and each block's attention over the image for the
    words (B, heads, T, N), the [CLS] row dropped. `image` None: the words alone.

    The mean, not [CLS] alone: the loss then reaches each word's own cross-attention directly
    ("red" learns to look at red) instead of only through [CLS]'s self-attention, which at
    initialisation barely listens to any word."""
    batch = tokens.shape[0]
    if token_mask is None:
        token_mask = torch.ones_like(tokens, dtype=torch.bool)
    token_mask = torch.cat([token_mask.new_ones(batch, 1), token_mask], dim=1)
    hidden, weights = text(
        tokens,
        image,
        token_mask=token_mask,
        need_weights=need_weights,
        prefix=cls.expand(batch, -1, -1),
        image_index=image_index,
    )
    return masked_mean(hidden, token_mask), [w[:, :, 1:] for w in weights]


@TASKS.register("vqa")
class VQAModel(AnswerClassifier):
    def __init__(self, config: ModelConfig, *, allow_pickle: bool = False):
        super().__init__(config, allow_pickle=allow_pickle)
        dim = self.config.text.dim
        self.text = FusedTextTransformer(
            self.config.text, self.vision.dim, config.fusion, causal=False
        )
        self.cls = nn.Parameter(torch.randn(1, 1, dim))  # unit scale, as the scaled embeddings
        self.head = answer_head(dim, config.num_answers)
        self.init_weights()

    def forward(
        self,
        images: Tensor,
        tokens: Tensor,
        token_mask: Tensor | None = None,
        image_index: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, list[Tensor]]:
        """Answer logits (B, num_answers) and, if asked, each block's attention over the image for
        the question tokens (B, heads, T, N) — the [CLS] row is dropped."""
        pooled, weights = read_with_cls(
            self.text,
            self.cls,
            tokens,
            token_mask,
            self.encode_image(images),
            image_index,
            need_weights,
        )
        return self.head(pooled), weights


@TASKS.register("classify")
class PairClassifier(VQAModel):
    """Image+text pair classification (a post's sentiment with its picture; does a statement
    hold of the image): the same fused text encoder and head as VQA, over the labels."""

    task = "classify"
