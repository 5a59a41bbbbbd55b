"""Visual question answering, and image+text pair classification: a text encoder whose blocks
cross-attend to the image tokens; the mean of its states is classified over the answers (or
labels) seen in training."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtfuse.config import ModelConfig
from vtfuse.encoders.text import FusedTextTransformer, read_with_cls
from vtfuse.fusion import fusion_builder
from vtfuse.models import across_ranks
from vtfuse.models.base import TaskModel, task_model
from vtfuse.tasks import CLASSIFY, VQA

NO_ANSWER = -1  # an answer outside the answer vocabulary: not scored


class AnswerClassifier(TaskModel):
    """VQA as classification over the answers seen in training; `forward(images, tokens,
    token_mask, image_index)` gives the answer logits."""

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


@task_model(VQA)
class VQAModel(AnswerClassifier):
    def __init__(self, config: ModelConfig, *, allow_pickle: bool = False):
        super().__init__(config, allow_pickle=allow_pickle)
        dim = self.config.text.dim
        self.text = FusedTextTransformer(
            self.config.text, self.vision.dim, fusion_builder(config.fusion), causal=False
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


@task_model(CLASSIFY)
class PairClassifier(VQAModel):
    """Image+text pair classification (a post's sentiment with its picture; does a statement
    hold of the image): the same fused text encoder and head as VQA, over the labels."""
