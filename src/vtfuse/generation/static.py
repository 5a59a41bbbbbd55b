"""A caption decoder's step with fixed shapes: the path `torch.compile` and ONNX export take.

The eager decoder (`FusedTextTransformer` with a `DecoderCache`) keeps Python state between
steps: a cache that grows, the number of positions read so far as a Python int. That is cheap
in eager PyTorch but cannot be traced or compiled once for every step. `StaticDecoder` computes
the same step as a pure function of tensors,

    logits, step_k, step_v = step(token (B,), position (), self_k, self_v, image_k, image_v)

with the self-attention keys and values of earlier positions in preallocated
(layers, B, heads, max_length, head_dim) tensors, read under the additive mask
`0 if arange(S) < p else -inf`, this position's own key and value attended beside them, and the
image's keys and values computed once (`image_cache`) and read at every step. The step returns
only this position's keys and values (layers, B, heads, 1, head_dim); the caller writes them into
slot `p`. A graph that wrote the slot itself (`where(arange(S) == p, new, old)`) would copy both
whole caches at every step: on ONNX Runtime at batch 32 that copy was a third of the step's time.
The weights are the model's own modules; nothing is copied.

It serves the decoders most captioners have: vtfuse's Transformer text side (learned positions)
with a fusion step that cross-attends to fixed image keys and values (`cross_attention`,
`gated_cross_attention`, `similarity`). `supports(model)` says whether a model has that shape
and, if not, why; the eager path decodes everything else.

`StaticDecoder` is also an `IncrementalDecoder` (`start` / `step`), so `greedy` and
`beam_search` drive it unchanged, and must give the eager decoder's tokens.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from vtfuse.blocks import FusionBlock
from vtfuse.encoders.context import PositionEmbedding
from vtfuse.fusion.cross_attention import CrossAttentionFusion


def supports(model: nn.Module) -> str | None:
    """Why `model` has no static decoding step, or None if it has one."""
    decoder = getattr(model, "decoder", None)
    if decoder is None or not hasattr(model, "lm_head"):
        return "only a caption decoder (vtfuse's own text side) has a static step"
    if not isinstance(decoder.context, PositionEmbedding):
        return f"text.encoder {decoder.config.encoder!r}: the static step has learned positions"
    if decoder.image_prefix is not None:
        return "a single-stream fusion (concat) has no fixed image keys and values"
    for block in decoder.blocks:
        if not isinstance(block, FusionBlock) or block.attn is None:
            return "every block needs its self-attention"
        if type(block.fusion).fuse is not CrossAttentionFusion.fuse:
            name = type(block.fusion).__name__
            return f"{name} changes with the text; the static step reads fixed image keys"
    return None


@dataclass
class StaticCache:
    """The decoding state as tensors: self-attention K/V (L, B, H, S, hd), the image's
    (L, B, H, N, hd), and the next position."""

    self_k: Tensor
    self_v: Tensor
    image_k: Tensor
    image_v: Tensor
    length: int = 0

    def write(self, step_k: Tensor, step_v: Tensor) -> None:
        """Store a step's keys and values (L, B, H, 1, hd) in the next slot."""
        self.self_k[:, :, :, self.length] = step_k[:, :, :, 0]
        self.self_v[:, :, :, self.length] = step_v[:, :, :, 0]
        self.length += 1

    def reorder(self, index: Tensor) -> None:
        """Beam i continues old row index[i]; beams of one image share its K/V, which stay.
        Copying whole caches was most of a beam step's time outside the model (profiled at 32
        rows), so only the rows whose beam changed take, in place, the slots written so far
        (the rest are masked)."""
        moved = (index != torch.arange(len(index), device=index.device)).nonzero()[:, 0]
        if len(moved) == 0:
            return
        filled = slice(0, self.length)
        for cache in (self.self_k, self.self_v):
            cache[:, moved, :, filled] = cache[:, index[moved], :, filled]  # gathered first

    def expand(self, index: Tensor) -> None:
        """Row i starts from row index[i], its image's K/V included (new, larger caches)."""
        self.self_k = self.self_k.index_select(1, index)
        self.self_v = self.self_v.index_select(1, index)
        self.image_k = self.image_k.index_select(1, index)
        self.image_v = self.image_v.index_select(1, index)


def _heads(x: Tensor, heads: int) -> Tensor:
    """(B, T, D) → (B, H, T, D / H)."""
    batch, length, dim = x.shape
    return x.view(batch, length, heads, dim // heads).transpose(1, 2)


def _logits(attention: nn.Module, q: Tensor, k: Tensor) -> Tensor:
    """score(q, k) (B, H, 1, S) in plain operations (export-safe): the attention module's own
    score (dot, cosine, negative distance) in its fast form, scale · q'·k'ᵀ + key_bias."""
    q, k, scale, key_bias = attention.score.fast(q, k)
    logits = (q @ k.transpose(-2, -1)) * scale
    return logits if key_bias is None else logits + key_bias


def _attend(attention: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(score(q, k)) · v for one query a row, through the module's output projection."""
    out = _logits(attention, q, k).softmax(dim=-1) @ v  # (B, H, 1, hd)
    return attention.to_out(out.transpose(1, 2).flatten(2))


def _attend_so_far(attention, q, past_k, past_v, k, v, earlier: Tensor) -> Tensor:
    """Self-attention of this position's query over the cached earlier positions (masked by the
    additive `earlier`, (S,)) and its own key: softmax over the S + 1 logits, then the weighted
    sum of the cached values and its own. Every score is per key, so the two parts are scored
    apart; the caches are read, never concatenated."""
    past = _logits(attention, q, past_k) + earlier  # (B, H, 1, S)
    weights = torch.cat([past, _logits(attention, q, k)], dim=-1).softmax(dim=-1)
    out = weights[..., :-1] @ past_v + weights[..., -1:] * v  # (B, H, 1, hd)
    return attention.to_out(out.transpose(1, 2).flatten(2))


class StaticDecoder(nn.Module):
    """The step of `model`'s caption decoder with fixed shapes (see the module docstring)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if (reason := supports(model)) is not None:
            raise ValueError(f"no static decoding step for this model: {reason}")
        self.model = model
        self.decoder, self.lm_head = model.decoder, model.lm_head
        self.max_length = self.decoder.config.max_length

    @property
    def shapes(self) -> tuple[int, int, int]:
        """(layers, heads, head_dim) of the self-attention caches."""
        attention = self.decoder.blocks[0].attn
        return len(self.decoder.blocks), attention.heads, attention.head_dim

    def describe(self) -> dict[str, int]:
        """What a runtime outside PyTorch needs to allocate the caches (an export's manifest)."""
        layers, heads, head_dim = self.shapes
        return {
            "max_length": self.max_length,
            "layers": layers,
            "heads": heads,
            "head_dim": head_dim,
        }

    def image_cache(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 images (B, 3, H, W) → each fusion step's image keys and values (L, B, H, N, hd)."""
        return self.image_keys(self.model.encode_image(images))

    def image_keys(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """Image tokens (B, N, D) → each fusion step's keys and values (L, B, H, N, hd)."""
        keys, values = zip(
            *(block.fusion.attn.project_kv(image) for block in self.decoder.blocks), strict=True
        )
        return torch.stack(keys), torch.stack(values)

    def forward(
        self,
        token: Tensor,
        position: Tensor,
        self_k: Tensor,
        self_v: Tensor,
        image_k: Tensor,
        image_v: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """token (B,) at `position` (a 0-d tensor) → next-token logits (B, V) and this
        position's self-attention keys and values (L, B, H, 1, hd), for slot `position`."""
        decoder = self.decoder
        context = decoder.context
        x = decoder.token_embedding(token[:, None]) * decoder.embedding_scale
        x = x + context.position_embedding(position)[None, None] * context.scale  # (B, 1, D)
        slots = torch.arange(self_k.shape[3], device=token.device)
        earlier = torch.zeros_like(slots, dtype=x.dtype).masked_fill(slots >= position, -torch.inf)
        new_k, new_v = [], []
        for i, block in enumerate(decoder.blocks):
            attention = block.attn
            h = block.norm_attn(x)
            q = _heads(attention.to_q(h), attention.heads)
            k, v = attention.project_kv(h)  # (B, H, 1, hd)
            new_k.append(k)
            new_v.append(v)
            x = x + _attend_so_far(attention, q, self_k[i], self_v[i], k, v, earlier)
            fusion = block.fusion
            q = _heads(fusion.attn.to_q(fusion.norm(x)), fusion.attn.heads)
            x = fusion.combine(x, _attend(fusion.attn, q, image_k[i], image_v[i]))
            x = x + block.mlp(block.norm_mlp(x))
        logits = self.lm_head(decoder.norm(x)[:, 0])
        return logits, torch.stack(new_k), torch.stack(new_v)

    # -- the IncrementalDecoder protocol (vtfuse.generation) ---------------------------------
    def start(self, images: Tensor) -> tuple[Tensor, StaticCache]:
        """The image tokens (which the step does not read: decoding carries them along) and
        the caches, the image's keys and values computed here once."""
        image = self.model.encode_image(images)
        image_k, image_v = self.image_keys(image)
        layers, heads, head_dim = self.shapes
        shape = (layers, images.shape[0], heads, self.max_length, head_dim)
        empty = image_k.new_zeros(shape)
        return image, StaticCache(empty, empty.clone(), image_k, image_v)

    def step(
        self, tokens: Tensor, image: Tensor, caches: StaticCache, need_weights: bool = False
    ) -> tuple[Tensor, list[Tensor]]:
        """Feed tokens (B, t) one position at a time → the logits after the last."""
        if need_weights:
            raise ValueError("the static step gives no attention maps: decode eagerly for them")

        def run(column: Tensor, caches: StaticCache) -> tuple[Tensor, Tensor, Tensor]:
            position = torch.tensor(caches.length, device=column.device)
            self_kv, image_kv = (caches.self_k, caches.self_v), (caches.image_k, caches.image_v)
            return self(column, position, *self_kv, *image_kv)

        return feed_columns(tokens, caches, self.max_length, run), []


class ImageKeys(nn.Module):
    """uint8 images → every fusion step's image keys and values: the graph an export runs
    once per image."""

    def __init__(self, static: StaticDecoder):
        super().__init__()
        self.static = static

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.static.image_cache(images)


def empty_caches(manifest: dict, batch: int, image_k: Tensor, image_v: Tensor) -> StaticCache:
    """Zeroed self-attention caches of an exported step (its manifest's shapes) beside the
    image's keys and values."""
    m = manifest
    shape = (m["layers"], batch, m["heads"], m["max_length"], m["head_dim"])
    empty = image_k.new_zeros(shape)
    return StaticCache(empty, empty.clone(), image_k, image_v)


class ExportedDecoder:
    """An `IncrementalDecoder` over an exported pair of functions — the image's keys and values
    (`image_keys`) and the static step (`run_step`) — read with the sizes in the export's
    `manifest`: the compiled packages and the ONNX graphs differ only in how they run those."""

    manifest: dict
    device: torch.device
    runtime: str  # named in errors: "compiled", "ONNX"

    def image_keys(self, images: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def run_step(self, column: Tensor, caches: StaticCache) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def start(self, images: Tensor) -> tuple[Tensor, StaticCache]:
        image_k, image_v = self.image_keys(images)
        # the image tokens stay inside the export: beam search carries this placeholder along
        image = image_k.new_zeros(images.shape[0], 1)
        return image, empty_caches(self.manifest, images.shape[0], image_k, image_v)

    def step(
        self, tokens: Tensor, image: Tensor, caches: StaticCache, need_weights: bool = False
    ) -> tuple[Tensor, list[Tensor]]:
        """Feed tokens (B, t) one position at a time → the logits after the last."""
        if need_weights:
            raise ValueError(
                f"{self.runtime} decoding gives no attention maps: use --runtime torch"
            )
        tokens = tokens.to(self.device)
        return feed_columns(tokens, caches, self.manifest["max_length"], self.run_step), []


def copy_model_files(model_folder: str | Path | None, out: Path) -> None:
    """An export folder is a whole model folder too (config, weights, tokenizer): copy the
    files of the one the model came from, if given."""
    out.mkdir(parents=True, exist_ok=True)
    for path in Path(model_folder).iterdir() if model_folder else ():
        if path.is_file():
            shutil.copy2(path, out / path.name)


Step = Callable[[Tensor, StaticCache], tuple[Tensor, Tensor, Tensor]]


def feed_columns(tokens: Tensor, caches: StaticCache, max_length: int, run: Step) -> Tensor:
    """The decoding loop of a static step: each column of tokens (B, t) through
    `run(column, caches)` → (logits, the position's keys, values), which go into the next slot
    of `caches`. Returns the logits after the last column."""
    for column in tokens.unbind(1):
        if caches.length >= max_length:
            raise ValueError(f"sequence longer than text.max_length {max_length}")
        logits, step_k, step_v = run(column, caches)
        caches.write(step_k, step_v)
    return logits
