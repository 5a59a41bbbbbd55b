"""Joint multi-task training: one model, a weighted sum of losses, as ALBEF (Li et al. 2021)
and BLIP (Li et al. 2022) are trained.

    L = Σ_k w_k · L_k,   k among
        itc  image-text contrastive: the dual encoder's symmetric InfoNCE (ALBEF §3.2)
        itm  image-text matching on hard negatives drawn from the ITC similarities (ALBEF §3.2)
        lm   captioning: next-token cross-entropy of a causal decoder (BLIP §3.2)

(`losses` and `loss_weights` in the model config; `vtfuse train --task joint --losses
itc,itm,lm --loss-weights 1,1,1`). One vision encoder feeds both text sides:

* the *encoder* is the retrieval model's (`RetrievalModel`, which this class extends): a
  bidirectional `FusedTextTransformer` with a [CLS] prefix, read without its fusion steps for
  ITC and with them for ITM;
* the *decoder* is the captioner's (`CaptionDecoding`): a causal `FusedTextTransformer` and a
  language-modelling head tied to the token embedding.

What is shared, as BLIP shares it (§3.2: "the text encoder and text decoder share all
parameters except for the SA layers"): the token embedding (and so the LM head), the
contextualiser (position table, or a left-to-right recurrent stack), every block's fusion step
(cross-attention), its MLP with the MLP's norm, and the final norm. The decoder's own weights
are its blocks' self-attention and its pre-norm: where encoding and decoding differ most. The
ITC/ITM parts (the [CLS] vector, the projections, the temperature, the matching head) are the
encoder's alone.

The data is the caption JSONL: each caption is read as the captioner reads it, <bos> words
<eos>; the encoder reads the same tokens without <bos> and <eos> (`encoder_view`), exactly as
the retrieval model reads its items. The model captions (`vtfuse caption`, generation) and
retrieves (`vtfuse retrieve`, re-ranking by the matching head); `vtfuse eval` reports both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from vtfuse.config import ModelConfig
from vtfuse.data.items import encoder_view
from vtfuse.encoders.text import FusedTextTransformer
from vtfuse.fusion import fusion_builder
from vtfuse.models.base import task_model
from vtfuse.models.captioner import CaptionDecoding
from vtfuse.models.retrieval import RetrievalModel
from vtfuse.tasks import JOINT

# An objective computes some of the chosen terms of a batch: (model, batch, label smoothing,
# the chosen terms it owns) → {term: loss}. ITC and ITM share one: the contrastive
# similarities pick the matching loss's hard negatives.
Objective = Callable[["JointModel", dict[str, Tensor], float, tuple[str, ...]], dict[str, Tensor]]


def _retrieval_terms(
    model: JointModel, batch: dict[str, Tensor], label_smoothing: float, terms: tuple[str, ...]
) -> dict[str, Tensor]:
    tokens, mask = encoder_view(batch["tokens"], batch.get("token_mask"))
    encoder_batch = {**batch, "tokens": tokens, "token_mask": mask}
    return model.retrieval_losses(encoder_batch, label_smoothing, terms)


def _caption_terms(
    model: JointModel, batch: dict[str, Tensor], label_smoothing: float, terms: tuple[str, ...]
) -> dict[str, Tensor]:
    return {"lm": model.caption_loss(batch, label_smoothing)}


OBJECTIVES: dict[str, Objective] = {
    "itc": _retrieval_terms,
    "itm": _retrieval_terms,
    "lm": _caption_terms,
}
LOSS_TERMS = tuple(OBJECTIVES)  # the default: all of them, each weight 1


def loss_weights(losses: Sequence[str], weights: Sequence[float]) -> dict[str, float]:
    """The chosen terms and their weights, checked: known names, each once, one finite
    non-negative weight per term (none given: 1 each), not all zero. () chooses them all."""
    losses = tuple(losses) or LOSS_TERMS
    unknown = [name for name in losses if name not in OBJECTIVES]
    if unknown:
        raise ValueError(
            f"unknown loss term(s) {', '.join(map(repr, unknown))}; choose among: "
            f"{', '.join(LOSS_TERMS)}"
        )
    repeated = sorted({name for name in losses if losses.count(name) > 1})
    if repeated:
        raise ValueError(f"loss term(s) {', '.join(repeated)} given more than once")
    weights = tuple(weights) or (1.0,) * len(losses)
    if len(weights) != len(losses):
        raise ValueError(
            f"{len(weights)} loss weight(s) for {len(losses)} loss term(s) "
            f"({', '.join(losses)}): give one weight per term"
        )
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
        raise ValueError(
            f"loss weights must be finite, >= 0 and not all 0, got {', '.join(map(str, weights))}"
        )
    return dict(zip(losses, map(float, weights), strict=True))


def share_all_but_self_attention(
    decoder: FusedTextTransformer, encoder: FusedTextTransformer
) -> None:
    """Make `decoder` use `encoder`'s weights everywhere but in its blocks' self-attention
    (BLIP §3.1); the modules are shared, so their parameters are one set."""
    for name in ("token_embedding", "context", "image_prefix", "norm"):
        setattr(decoder, name, getattr(encoder, name))
    for own, shared in zip(decoder.blocks, encoder.blocks, strict=True):
        for name in ("fusion", "norm_mlp", "mlp"):
            setattr(own, name, getattr(shared, name))


@task_model(JOINT)
class JointModel(CaptionDecoding, RetrievalModel):
    """The retrieval model (ITC + ITM) with a caption decoder (LM) beside its text encoder,
    trained on Σ w_k L_k. `forward` is the retrieval model's (matching logits)."""

    def __init__(self, config: ModelConfig, *, allow_pickle: bool = False):
        weights = loss_weights(config.losses, config.loss_weights)
        # vision encoder, text encoder, ITC and ITM parts
        super().__init__(config, allow_pickle=allow_pickle)
        self.weights = weights
        self.decoder = FusedTextTransformer(
            self.config.text, self.vision.dim, fusion_builder(config.fusion), causal=True
        )
        share_all_but_self_attention(self.decoder, self.text)
        self.lm_head = nn.Linear(self.config.text.dim, self.config.text.vocab_size, bias=False)
        self.lm_head.weight = self.text.token_embedding.weight  # weight tying (Press & Wolf 2017)
        self.init_weights()

    @property
    def leaves_parameters_unused(self) -> bool:
        """Every part trains only when every term does (ITC alone leaves the decoder's
        self-attention and the matching head without a gradient)."""
        return {name for name, weight in self.weights.items() if weight} != set(LOSS_TERMS)

    def losses(self, batch: dict[str, Tensor], label_smoothing: float = 0.0) -> dict[str, Tensor]:
        """Each chosen term, unweighted, in the order chosen (no `itm` for a batch of one
        image); `batch` holds caption items (`caption_items`)."""
        chosen = tuple(self.weights)
        found: dict[str, Tensor] = {}
        for objective in dict.fromkeys(OBJECTIVES[name] for name in chosen):
            owned = tuple(name for name in chosen if OBJECTIVES[name] is objective)
            found.update(objective(self, batch, label_smoothing, owned))
        return {name: found[name] for name in chosen if name in found}

    def scored_targets(self, batch: dict[str, Tensor]) -> Tensor | None:
        """The captioning term's tokens (the contrastive and matching terms are batch means)."""
        return self.caption_tokens(batch) if "lm" in self.weights else None

    def combine(self, terms: dict[str, Tensor]) -> Tensor:
        """Σ w_k · L_k over the terms computed."""
        return sum(self.weights[name] * loss for name, loss in terms.items())
