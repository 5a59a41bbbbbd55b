"""The symmetric image-text contrastive loss (InfoNCE; Radford et al. 2021), over every rank's
batch when training data-parallel.

Contrasting each rank's texts only with its own images would make N processes × batch B a
weaker objective than one process × batch N·B (B − 1 negatives instead of N·B − 1). So while
training under torch.distributed, the embeddings of all ranks are gathered — with their
gradients, which flow back to the rank that computed them (open_clip's `gather_with_grad`) —
and each rank's loss covers its own rows against all columns, scaled so that the mean DDP/FSDP
takes over the ranks is the one-process loss of the whole global batch:

    L_itc = ½ [ Σ_local texts CE(s · t Iᵀ, its image) / B_all
              + Σ_local images CE(s · i Tᵀ, its texts) / I_all ] · N

In one process (N = 1, nothing gathered) this is the plain batch mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vtfuse.models.across_ranks import gather_rows, world


def contrastive_loss(
    text_embeddings: Tensor,
    image_embeddings: Tensor,
    owner: Tensor,
    scale: Tensor,
    label_smoothing: float = 0.0,
    image_ids: Tensor | None = None,
) -> Tensor:
    """Texts (B, d) and images (I, d), unit rows; `owner` (B,) the image of each text. An image
    with several texts has them all as positives (a uniform target). `image_ids` (I,) name the
    images across ranks: an image whose texts fell into several ranks' batches is one column
    and one row, as it would be in one process's batch of them all."""
    ranks = world() if text_embeddings.requires_grad else 1  # gather while training only
    named = image_ids is not None
    ids = image_ids if named else torch.arange(len(image_embeddings), device=owner.device)
    texts, images, owner_everywhere, first_image = text_embeddings, image_embeddings, owner, 0
    if ranks > 1:
        [images, ids], first_image = gather_rows(image_embeddings, ids)
        if not named:  # each rank's image rows are images of their own
            ids = torch.arange(len(images), device=ids.device)
        owner = owner + first_image  # indices into the gathered images
        [texts, owner_everywhere], _ = gather_rows(text_embeddings, owner)

    # One column per distinct image: `column[j]` for every gathered image row j.
    first = (ids[:, None] == ids[None, :]).int().argmax(dim=1)  # the first row with j's id
    distinct = first == torch.arange(len(ids), device=ids.device)
    column = (distinct.cumsum(0) - 1)[first]
    text_to_image = F.cross_entropy(
        scale * text_embeddings @ images[distinct].T,
        column[owner],
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    mine = torch.arange(len(image_embeddings), device=ids.device) + first_image
    rows = distinct[mine]  # this rank's images that are not another rank's too
    positives = (column[owner_everywhere][None, :] == column[mine[rows]][:, None]).float()
    targets = positives / positives.sum(dim=1, keepdim=True)
    logits = scale * image_embeddings[rows] @ texts.T  # (own distinct images, B_all)
    image_to_text = -(targets * logits.log_softmax(dim=-1)).sum()
    return ranks * (text_to_image / len(texts) + image_to_text / int(distinct.sum())) / 2
