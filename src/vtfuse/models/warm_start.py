"""Starting a model from another's weights (`vtfuse train --init-from`): a VQA model from a
captioner, say."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vtfuse.data.tokenizer import AnyTokenizer, Tokenizer
from vtfuse.models.base import TaskModel
from vtfuse.models.factory import load_pretrained
from vtfuse.weights import CheckpointError


@dataclass
class WarmStart:
    """What `warm_start` copied."""

    tensors: int  # weights copied whole (same name, same shape)
    words: int  # token-embedding rows copied for words both vocabularies share
    left: list[str]  # the source's weights that found no same-named, same-shaped target


def _fusion_block_key(name: str) -> tuple[int, str] | None:
    """A fusion block inserted in a pretrained LM, named by its layer and its own parameter:
    "lm.bert.encoder.layer.2.fusion.attn.to_q.weight" (a BERT decoder) and
    "lm.encoder.layer.2.fusion.attn.to_q.weight" (the same BERT as an encoder) → (2, ...)."""
    if not name.startswith("lm.") or ".fusion." not in name:
        return None
    path, parameter = name.split(".fusion.", 1)
    return int(path.rsplit(".", 1)[1]), parameter


def _shared_words(tokenizer: AnyTokenizer, source: AnyTokenizer) -> list[tuple[int, int]]:
    """(row, source row) of the words two word vocabularies share (an LM's tokenizer: none)."""
    if not (isinstance(tokenizer, Tokenizer) and isinstance(source, Tokenizer)):
        return []
    return [
        (row, source.word_ids[word])
        for row, word in enumerate(tokenizer.words)
        if word in source.word_ids
    ]


def warm_start(
    model: TaskModel, tokenizer: AnyTokenizer, folder: str | Path, allow_pickle: bool = False
) -> WarmStart:
    """Initialise `model` from another vtfuse model, e.g. a VQA model from a captioner, as
    captioning pretraining does for VirTex (Desai & Johnson 2021) and BLIP: every weight with
    the same name and shape is copied, and the token embedding row by row for the words the
    two vocabularies share. The rest (a VQA answer head, say) keeps its initialisation."""
    source, source_tokenizer = load_pretrained(folder, allow_pickle=allow_pickle)
    target, weights = model.state_dict(), source.state_dict()
    by_block = {_fusion_block_key(name): name for name in target if _fusion_block_key(name)}
    embedding, tied_head = "text.token_embedding.weight", "lm_head.weight"
    tensors, left = 0, []
    with torch.no_grad():
        for name, weight in weights.items():
            if name in (embedding, tied_head):
                continue
            to = name if name in target else by_block.get(_fusion_block_key(name), name)
            if to in target and target[to].shape == weight.shape:
                target[to].copy_(weight)
                tensors += 1
            else:
                left.append(name)
        shared = _shared_words(tokenizer, source_tokenizer)  # both: vtfuse's own text side
        if shared and weights[embedding].shape[1] == target[embedding].shape[1]:
            rows, from_rows = (list(column) for column in zip(*shared, strict=True))
            target[embedding][rows] = weights[embedding][from_rows].to(target[embedding].dtype)
        else:
            shared = []
    if tensors == 0:
        raise CheckpointError(
            f"{folder}: no weight matches this model by name and shape; nothing to start from"
        )
    return WarmStart(tensors, len(shared), left)
