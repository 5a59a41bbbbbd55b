"""Image-text retrieval and matching, as ALBEF (Li et al. 2021) and BLIP (Li et al. 2022) do.

* A dual encoder for fast retrieval: the image's tokens pooled by attention (`AttentionPool`)
  and the text's [CLS] state (the text encoder with its fusion steps off), each projected and
  L2-normalised, trained with the symmetric contrastive loss (InfoNCE; Radford et al. 2021)
  at a learned temperature:

      L_itc = ½ [CE(s · T Iᵀ, image of each text) + CE(s · I Tᵀ, the image's texts)]

  An image with several captions in a batch has them all as positives (uniform target); under
  data parallelism the batch is every rank's (`vtfuse.models.contrastive`).
* A matching head for precise re-ranking: the *same* text encoder with its fusion steps on
  (cross-attention to the image tokens) says whether text and image belong together. It is
  trained on each positive pair plus, per pair, a hard negative image and a hard negative
  text sampled in proportion to their contrastive similarity (ALBEF, §3.2).

Retrieval ranks by the dual encoder, then re-scores its top k with the matching head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtfuse.attention import MultiHeadAttention
from vtfuse.config import ModelConfig
from vtfuse.encoders.text import FusedTextTransformer, read_with_cls
from vtfuse.fusion import fusion_builder
from vtfuse.models.base import TaskModel, task_model
from vtfuse.models.contrastive import contrastive_loss
from vtfuse.tasks import RETRIEVAL


class AttentionPool(nn.Module):
    """CLIP's attention pooling (Radford et al. 2021, §2.4), written as a residual step:

        g = mean_j x_j;      pooled = g + Attn(q = LN(g), k = v = LN(x))

    A mean alone is linear: it adds up "red", "circle" and "top left" over the tokens and keeps
    no record of which went together, so a caption that swaps two objects' colours or places
    embeds as close as the true one (measured on the quickstart's scenes: about half of a
    mean-pooled model's image→text errors retrieved a caption with the same colours on other
    shapes or in other places). Attention weights depend on the content, so a head can single
    out one object's tokens and carry its colour, shape and, through each token's position,
    its place. With `attend.to_out` at zero this is the mean (how models saved before it are
    read)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_query = nn.LayerNorm(dim)
        self.norm_tokens = nn.LayerNorm(dim)
        self.attend = MultiHeadAttention(dim, heads)

    def forward(self, tokens: Tensor) -> Tensor:
        """(I, N, dim) → (I, dim)."""
        mean = tokens.mean(dim=1, keepdim=True)
        read, _ = self.attend(self.norm_query(mean), self.norm_tokens(tokens))
        return (mean + read).squeeze(1)


@task_model(RETRIEVAL)
class RetrievalModel(TaskModel):
    def __init__(self, config: ModelConfig, *, allow_pickle: bool = False):
        super().__init__(config, allow_pickle=allow_pickle)
        dim = self.config.text.dim
        self.text = FusedTextTransformer(
            self.config.text, self.vision.dim, fusion_builder(config.fusion), causal=False
        )
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.image_pool = AttentionPool(self.vision.dim, self.config.vision.heads)
        self.image_projection = nn.Linear(self.vision.dim, dim)
        self.text_projection = nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's start
        self.match_head = nn.Linear(dim, 2)  # (no match, match)
        self.init_weights()

    # -- the two encoders and the matching head ------------------------------------------------
    def embed_images(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 (I, 3, H, W) → unit embeddings (I, dim), and the image tokens (I, N, d)."""
        tokens = self.encode_image(images)
        return F.normalize(self.image_projection(self.image_pool(tokens)), dim=-1), tokens

    def embed_texts(self, tokens: Tensor, token_mask: Tensor | None = None) -> Tensor:
        """(B, T) → unit embeddings (B, dim): the text encoder without its fusion steps."""
        pooled, _ = read_with_cls(self.text, self.cls, tokens, token_mask, None)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def match_logits(
        self,
        tokens: Tensor,
        token_mask: Tensor | None,
        image_tokens: Tensor,
        image_index: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, list[Tensor]]:
        """(no match, match) logits (B, 2) for each text with its image (`image_index`)."""
        pooled, weights = read_with_cls(
            self.text, self.cls, tokens, token_mask, image_tokens, image_index, need_weights
        )
        return self.match_head(pooled), weights

    def forward(
        self,
        images: Tensor,
        tokens: Tensor,
        token_mask: Tensor | None = None,
        image_index: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, list[Tensor]]:
        """Match logits (B, 2) and, if asked, each block's attention over the image."""
        return self.match_logits(
            tokens, token_mask, self.encode_image(images), image_index, need_weights
        )

    @property
    def scale(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=100.0)  # CLIP's cap on 1/temperature

    # -- training ----------------------------------------------------------------------------
    def training_loss(self, batch: dict[str, Tensor], label_smoothing: float = 0.0) -> Tensor:
        return self.training_losses(batch, label_smoothing)["loss"]

    def training_losses(
        self, batch: dict[str, Tensor], label_smoothing: float = 0.0
    ) -> dict[str, Tensor]:
        terms = self.losses(batch, label_smoothing)
        return {"loss": self.combine(terms), **{f"loss_{k}": v for k, v in terms.items()}}

    def validation_metrics(self, batch: dict[str, Tensor]) -> dict[str, float]:
        terms = self.losses(batch)
        return {"loss": self.combine(terms).item(), **{k: v.item() for k, v in terms.items()}}

    def combine(self, terms: dict[str, Tensor]) -> Tensor:
        """The training loss from its terms: here their sum."""
        return sum(terms.values())

    def losses(self, batch: dict[str, Tensor], label_smoothing: float = 0.0) -> dict[str, Tensor]:
        """The contrastive (`itc`) and matching (`itm`) losses of a batch."""
        return self.retrieval_losses(batch, label_smoothing, ("itc", "itm"))

    def retrieval_losses(
        self, batch: dict[str, Tensor], label_smoothing: float, terms: tuple[str, ...]
    ) -> dict[str, Tensor]:
        """`terms` among itc and itm. The matching loss's hard negatives are picked by the
        contrastive similarities within this rank's batch. No `itm` for a batch of one image."""
        tokens, mask = batch["tokens"], batch.get("token_mask")
        owner = batch.get("image_index")
        if owner is None:
            owner = torch.arange(tokens.shape[0], device=tokens.device)
        image_embeddings, image_tokens = self.embed_images(batch["images"])
        text_embeddings = self.embed_texts(tokens, mask)
        losses = {}
        if "itc" in terms:  # over all ranks' batches when data-parallel
            losses["itc"] = contrastive_loss(
                text_embeddings,
                image_embeddings,
                owner,
                self.scale,
                label_smoothing,
                batch.get("image_ids"),
            )
        if "itm" in terms and len(image_embeddings) > 1:  # negatives need a second image
            logits = self.scale * text_embeddings @ image_embeddings.T  # (B, I), this rank's
            losses["itm"] = self._matching_loss(tokens, mask, image_tokens, owner, logits)
        return losses

    def _matching_loss(
        self,
        tokens: Tensor,
        mask: Tensor | None,
        image_tokens: Tensor,
        owner: Tensor,
        logits: Tensor,
    ) -> Tensor:
        """Each positive pair, its text with a hard negative image, its image with a hard
        negative text; negatives drawn ∝ softmax(similarity) (the hardest one in eval mode)."""
        with torch.no_grad():
            same = owner[:, None] == owner[None, :]  # (B, B): texts of one image
            wrong_image = (
                logits.float()
                .softmax(dim=1)
                .masked_fill(F.one_hot(owner, logits.shape[1]).bool(), 0.0)
            )  # (B, I)
            by_text = logits.float().T.softmax(dim=1)[owner]  # (B, B): own image's view of texts
            wrong_text = by_text.masked_fill(same, 0.0)
            usable = wrong_text.sum(dim=1) > 0  # some other text exists in the batch
            wrong_text[~usable] = 1.0  # placeholder rows, dropped below
            negative_image, negative_text = self._draw(wrong_image), self._draw(wrong_text)
        full_mask = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask
        all_tokens = torch.cat([tokens, tokens, tokens[negative_text][usable]])
        all_mask = torch.cat([full_mask, full_mask, full_mask[negative_text][usable]])
        all_images = torch.cat([owner, negative_image, owner[usable]])
        labels = torch.cat(
            [torch.ones_like(owner), torch.zeros_like(owner), torch.zeros_like(owner[usable])]
        )
        match, _ = self.match_logits(all_tokens, all_mask, image_tokens, all_images)
        return F.cross_entropy(match, labels)

    def _draw(self, weights: Tensor) -> Tensor:
        if self.training:
            return torch.multinomial(weights, 1).squeeze(1)
        return weights.argmax(dim=1)
