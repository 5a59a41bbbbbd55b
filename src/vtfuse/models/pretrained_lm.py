"""Task models on a pretrained language model: a captioner (the LM decodes, fusion blocks
injected between its layers: `vtfuse.lm.inject`) and a question answerer (the LM, or a bare
encoder such as MiniLM, reads the question), with the decoding cache they share."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from vtfuse.attention import KVCache
from vtfuse.config import ModelConfig
from vtfuse.encoders.text import masked_mean
from vtfuse.fusion import fusion_builder
from vtfuse.fusion.resampler import PerceiverResampler
from vtfuse.grad_checkpointing import train_checkpointing_layers
from vtfuse.lm.inject import ImageContext, Interleaving, inject_cross_attention
from vtfuse.lm.load import load_causal_lm, load_text_encoder
from vtfuse.models import across_ranks
from vtfuse.models.base import TaskModel, task_model
from vtfuse.models.vqa import AnswerClassifier, answer_head
from vtfuse.tasks import CAPTION, CLASSIFY, VQA


@dataclass
class LMCache:
    """Decoding state: the LM's own KV cache and the inserted blocks' once-per-image K/V."""

    lm: object | None
    fusion: list[KVCache]
    images_per_row: int = 0  # interleaved images: M per row (0: one image, every word sees it)
    images_seen: Tensor | None = None  # (B,) <image> tokens decoded so far
    latent_map: Tensor | None = None  # resampler: (B, M, N) each latent's map over the grid

    def reorder(self, index: Tensor) -> None:
        """Follow beam search: row i becomes old row `index[i]`."""
        if self.lm is not None:
            self.lm.reorder_cache(index)
        for cache in self.fusion:
            cache.reorder(index)
        self._select(index)

    def _select(self, index: Tensor) -> None:
        if self.images_seen is not None:
            self.images_seen = self.images_seen.index_select(0, index)
        if self.latent_map is not None:
            self.latent_map = self.latent_map.index_select(0, index)

    def expand(self, index: Tensor) -> None:
        """Give each row `index[i]`'s state, the per-image K/V included (beams from images)."""
        self._select(index)
        if self.lm is not None:
            self.lm.batch_select_indices(index)
        for cache in self.fusion:
            cache.select_rows(index)


class PretrainedTextModel(TaskModel):
    """A task model around a pretrained `transformers` model: its weights kept (frozen by
    default, `lm.freeze`), a fusion block before every `lm.xattn_every`-th layer, and only
    what is new or unfrozen trained and saved (`trainable_state_dict`) — the LM's own weights
    stay in its files."""

    causal = False  # a causal LM (a caption decoder): its fusion blocks see no later word

    def __init__(self, config: ModelConfig, lm: nn.Module, *, allow_pickle: bool = False):
        super().__init__(config, allow_pickle=allow_pickle)
        self.lm = lm.requires_grad_(not config.lm.freeze)
        for name in getattr(lm, "new_weights", ()):
            lm.get_parameter(name).requires_grad_(True)
        self.context, self.inserted = inject_cross_attention(
            lm, self.vision.dim, fusion_builder(config.fusion), config.lm.xattn_every
        )
        self.resampler = None  # Flamingo: one resampler before all the blocks
        if config.lm.resampler_latents:
            latents = replace(config.fusion, latents=config.lm.resampler_latents)
            dim = self.vision.dim
            self.resampler = PerceiverResampler(dim, config.vision.heads, dim, latents)

    @property
    def tokens_per_image(self) -> int:
        """How many tokens of each image (or clip) the blocks read: the grid's (times the
        frames of a clip), or the latents."""
        if self.resampler is not None:
            return self.config.lm.resampler_latents
        return self.config.vision.frames * self.grid_size[0] * self.grid_size[1]

    def read_images(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """uint8 (I, 3, H, W) (or clips (I, F, 3, H, W)) → what the blocks attend to
        (I, N or M, dim) and, with a resampler, each latent's attention over the image's (or
        clip's) tokens (I, M, N) for the maps."""
        tokens = super().encode_image(images)
        if self.resampler is None:
            return tokens, None
        latents, weights = self.resampler.resample(tokens, need_weights=True)
        return latents, weights.mean(dim=1)

    def encode_image(self, images: Tensor) -> Tensor:
        return self.read_images(images)[0]

    def train(self, mode: bool = True) -> PretrainedTextModel:
        """A frozen LM stays in eval mode (no dropout): it computes what it was trained to
        (its layers still checkpoint, if asked: see `train_checkpointing_layers`)."""
        super().train(mode)
        if self.config.lm.freeze:
            self.lm.eval()
            train_checkpointing_layers(self.lm, mode)
            for block in self.inserted:
                block.fusion.train(mode)
        return self

    @contextmanager
    def seeing(
        self,
        image: Tensor,
        image_index: Tensor | None = None,
        caches: list[KVCache] | None = None,
        need_weights: bool = False,
        interleaved: Interleaving | None = None,
        latent_map: Tensor | None = None,
        token_mask: Tensor | None = None,
    ) -> Iterator[ImageContext]:
        """Within the block, the inserted layers attend to `image`; a decoder's (`causal`)
        layers see no later word."""
        context = self.context
        context.image, context.image_index, context.caches = image, image_index, caches
        context.need_weights, context.weights = need_weights, []
        context.interleaved, context.latent_map = interleaved, latent_map
        context.token_mask, context.causal = token_mask, self.causal
        try:
            yield context
        finally:
            context.image = context.image_index = context.caches = None
            context.interleaved = context.latent_map = context.token_mask = None


@task_model(VQA, pretrained_lm=True)
class LMQuestionAnswerer(AnswerClassifier, PretrainedTextModel):
    """A pretrained text encoder (BERT, MiniLM, or an LM's body) reads the question with
    fusion blocks between its layers; the mean of its states is classified over the answers."""

    def __init__(
        self, config: ModelConfig, lm: nn.Module | None = None, *, allow_pickle: bool = False
    ):
        if lm is None:
            lm = load_text_encoder(config.lm.name, allow_pickle)
        super().__init__(config, lm, allow_pickle=allow_pickle)
        self.head = answer_head(self.lm.config.hidden_size, config.num_answers)

    def forward(
        self,
        images: Tensor,
        tokens: Tensor,
        token_mask: Tensor | None = None,
        image_index: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, list[Tensor]]:
        """Answer logits (B, num_answers) and, if asked, each block's map (B, H, T, N)."""
        if token_mask is None:
            token_mask = torch.ones_like(tokens, dtype=torch.bool)
        image, latent_map = self.read_images(images)
        with self.seeing(
            image, image_index, None, need_weights, None, latent_map, token_mask
        ) as seen:
            hidden = self.lm(input_ids=tokens, attention_mask=token_mask.long()).last_hidden_state
        return self.head(masked_mean(hidden, token_mask)), seen.weights


@task_model(CLASSIFY, pretrained_lm=True)
class LMPairClassifier(LMQuestionAnswerer):
    """Image+text pair classification with a pretrained text encoder: the question answerer's
    parts, over the labels."""


@task_model(CAPTION, pretrained_lm=True)
class LMCaptioner(PretrainedTextModel):
    """Vision encoder → a pretrained causal LM that cross-attends to the image tokens.

    `images` are (B, 3, H, W) (a clip model: clips (B, F, 3, H, W)), one per sequence, seen by
    every word; or, interleaved, (B, M, 3, H, W) (clips: (B, M, F, 3, H, W)): M per sequence,
    the m-th opened by the m-th `lm.image_token_id` in the tokens, each word seeing only its
    latest image (or all so far: `attend_to_all_images`).
    The LM comes from `config.lm.name` unless a loaded one is passed.
    """

    causal = True

    def __init__(
        self, config: ModelConfig, lm: nn.Module | None = None, *, allow_pickle: bool = False
    ):
        if lm is None:
            lm = load_causal_lm(config.lm.name, allow_pickle)
        super().__init__(config, lm, allow_pickle=allow_pickle)
        settings = config.lm
        self.image_token_id = settings.image_token_id if settings.image_token_id >= 0 else None
        self.attend_to_all_images = settings.attend_to_all_images
        # the LM's cache argument: `cache` in transformers 5, `past_key_values` before
        self._cache_argument = (
            "cache"
            if "cache" in inspect.signature(self.lm.forward).parameters
            else "past_key_values"
        )

    def read_images(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Also takes interleaved images (B, M, 3, H, W) → (B, M·N, dim), without maps."""
        if images.dim() <= self.visual_dims:
            return super().read_images(images)
        if self.image_token_id is None:
            raise ValueError("several images per sequence need the model's lm.image_token_id")
        tokens, _ = super().read_images(images.flatten(0, 1))
        return tokens.reshape(images.shape[0], -1, tokens.shape[-1]), None

    def interleaving(
        self, tokens: Tensor, images_per_row: int, seen_before: Tensor | None = None
    ) -> tuple[Interleaving | None, Tensor | None]:
        if not images_per_row:
            return None, None
        return Interleaving.of(
            tokens,
            self.image_token_id,
            images_per_row,
            self.tokens_per_image,
            seen_before,
            self.attend_to_all_images,
        )

    def forward(
        self,
        images: Tensor,
        tokens: Tensor,
        image_index: Tensor | None = None,
        need_weights: bool = False,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Teacher forcing: logits (B, T, vocab) and, if asked, each inserted block's map."""
        images_per_row = images.shape[1] if images.dim() > self.visual_dims else 0
        interleaved, _ = self.interleaving(tokens, images_per_row)
        image, latent_map = self.read_images(images)
        with self.seeing(image, image_index, None, need_weights, interleaved, latent_map) as seen:
            logits = self.lm(
                input_ids=tokens, attention_mask=attention_mask, use_cache=False
            ).logits  # teacher forcing keeps no cache (nor would a checkpointed layer)
        return logits, seen.weights

    def training_loss(self, batch: dict[str, Tensor], label_smoothing: float = 0.0) -> Tensor:
        """Next-token cross-entropy; padding (outside `token_mask`) is neither read nor scored."""
        tokens, mask = batch["tokens"], batch.get("token_mask")
        inputs_mask = None if mask is None else mask[:, :-1].long()
        logits, _ = self(
            batch["images"], tokens[:, :-1], batch.get("image_index"), attention_mask=inputs_mask
        )
        return across_ranks.cross_entropy(
            logits.flatten(0, 1).float(),
            self._next_tokens(batch).flatten(),
            label_smoothing=label_smoothing,
            per_batch=batch.get("targets_per_batch"),
        )

    def scored_targets(self, batch: dict[str, Tensor]) -> Tensor:
        return across_ranks.scored(self._next_tokens(batch))

    @staticmethod
    def _next_tokens(batch: dict[str, Tensor]) -> Tensor:
        """Each position's next token; padding (outside `token_mask`) left out."""
        targets, mask = batch["tokens"][:, 1:], batch.get("token_mask")
        if mask is None:
            return targets
        return targets.masked_fill(~mask[:, 1:].bool(), across_ranks.IGNORED)

    # -- incremental decoding, the interface of vtfuse.generation ------------------------------
    def start(self, images: Tensor) -> tuple[Tensor, LMCache]:
        caches = LMCache(None, [KVCache() for _ in self.inserted])
        if images.dim() > self.visual_dims:
            caches.images_per_row = images.shape[1]
            caches.images_seen = images.new_zeros(images.shape[0], dtype=torch.long)
        image, caches.latent_map = self.read_images(images)
        return image, caches

    def step(
        self, tokens: Tensor, image: Tensor, caches: LMCache, need_weights: bool = False
    ) -> tuple[Tensor, list[Tensor]]:
        """New tokens (B, t) after the cached ones → next-token logits (B, vocab)."""
        interleaved, seen_after = self.interleaving(
            tokens, caches.images_per_row, caches.images_seen
        )
        with self.seeing(
            image, None, caches.fusion, need_weights, interleaved, caches.latent_map
        ) as seen:
            out = self.lm(input_ids=tokens, use_cache=True, **{self._cache_argument: caches.lm})
        caches.lm, caches.images_seen = out[self._cache_argument], seen_after
        return out.logits[:, -1], seen.weights
