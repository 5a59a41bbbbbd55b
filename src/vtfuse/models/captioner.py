"""Image captioning: vision encoder → causal decoder that cross-attends to the image tokens."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from vtfuse.blocks import DecoderCache
from vtfuse.config import ModelConfig
from vtfuse.encoders.text import FusedTextTransformer
from vtfuse.fusion import fusion_builder
from vtfuse.models import across_ranks
from vtfuse.models.base import TaskModel, task_model
from vtfuse.tasks import CAPTION


def next_tokens(tokens: Tensor) -> Tensor:
    """The targets of teacher forcing: each position's next token, padding (id 0) ignored."""
    return tokens[:, 1:].masked_fill(tokens[:, 1:] == 0, across_ranks.IGNORED)


class CaptionDecoding:
    """Captioning on a task model with a `decoder` (a causal `FusedTextTransformer`) and an
    `lm_head` (and TaskModel's `encode_image`): teacher-forced logits, the language-modelling
    loss, and the incremental decoding `vtfuse.generation` drives. Shared by the `Captioner`,
    whose decoder is its whole text side, and the joint model (`vtfuse.models.joint`), whose
    decoder sits beside an encoder."""

    decoder: FusedTextTransformer
    lm_head: nn.Linear

    def caption_logits(
        self,
        images: Tensor,
        tokens: Tensor,
        image_index: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, list[Tensor]]:
        """Teacher forcing: logits (B, T, vocab) for the token after each of `tokens`."""
        image = self.encode_image(images)
        hidden, weights = self.decoder(
            tokens, image, need_weights=need_weights, image_index=image_index
        )
        return self.lm_head(hidden), weights

    def caption_loss(self, batch: dict[str, Tensor], label_smoothing: float = 0.0) -> Tensor:
        """Next-token cross-entropy over <bos> words <eos>, padding (id 0) left out: the mean
        over the step's tokens (`targets_per_batch`, see `TaskModel.scored_targets`)."""
        tokens = batch["tokens"]  # (B, T): <bos> words <eos> <pad>...
        logits, _ = self.caption_logits(batch["images"], tokens[:, :-1], batch.get("image_index"))
        return across_ranks.cross_entropy(
            logits.flatten(0, 1),
            next_tokens(tokens).flatten(),
            label_smoothing=label_smoothing,
            per_batch=batch.get("targets_per_batch"),
        )

    def caption_tokens(self, batch: dict[str, Tensor]) -> Tensor:
        """The tokens `caption_loss` scores in `batch`."""
        return across_ranks.scored(next_tokens(batch["tokens"]))

    # -- incremental decoding, used by vtfuse.generation ------------------------------------
    def start(self, images: Tensor) -> tuple[Tensor, DecoderCache]:
        """Encode the images once and open empty caches for decoding."""
        return self.encode_image(images), self.decoder.new_cache()

    def step(
        self, tokens: Tensor, image: Tensor, caches: DecoderCache, need_weights: bool = False
    ) -> tuple[Tensor, list[Tensor]]:
        """Feed new tokens (B, t) after the cached ones → next-token logits (B, vocab).
        The image's cross-attention K/V are computed on the first step and reused after."""
        hidden, weights = self.decoder(tokens, image, caches=caches, need_weights=need_weights)
        return self.lm_head(hidden[:, -1]), weights


@task_model(CAPTION)
class Captioner(CaptionDecoding, TaskModel):
    # Dropout 0.1 in the decoder (GPT-2's and BLIP's text decoder's rate). Measured from scratch
    # on Sort-of-CLEVR captions (2000 images, 15 minutes on one core, default flags otherwise;
    # benchmarks/learning.py): object F1 0.935 and 0.8975 for seeds 0 and 1 without it, the
    # training loss reaching 0 while the validation loss rose again
    # (results/learning_caption_no_dropout.json); 0.9725, 0.9675 and 0.9608 for seeds 0-2 with it
    # (results/learning_caption.json). Encoders keep 0: not measured to help.
    default_text_dropout: ClassVar[float] = 0.1

    def __init__(self, config: ModelConfig, *, allow_pickle: bool = False):
        super().__init__(config, allow_pickle=allow_pickle)
        self.text = FusedTextTransformer(
            self.config.text, self.vision.dim, fusion_builder(config.fusion), causal=True
        )
        self.lm_head = nn.Linear(self.config.text.dim, self.config.text.vocab_size, bias=False)
        self.lm_head.weight = self.text.token_embedding.weight  # weight tying (Press & Wolf 2017)
        self.init_weights()

    @property
    def decoder(self) -> FusedTextTransformer:
        """The whole text side is the decoder (named `text` in checkpoints)."""
        return self.text

    def forward(
        self,
        images: Tensor,
        tokens: Tensor,
        image_index: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, list[Tensor]]:
        """Teacher forcing: logits (B, T, vocab) for the token after each of `tokens`."""
        return self.caption_logits(images, tokens, image_index, need_weights)

    def training_loss(self, batch: dict[str, Tensor], label_smoothing: float = 0.0) -> Tensor:
        return self.caption_loss(batch, label_smoothing)

    def scored_targets(self, batch: dict[str, Tensor]) -> Tensor:
        return self.caption_tokens(batch)
