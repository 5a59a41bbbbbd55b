"""Image-text retrieval and matching, from captioned images (the caption task's lines): an
encoder reads each caption, and images and captions are matched (contrastive + ITM)."""

from __future__ import annotations

from vtfuse.data.items import Item, Truncation
from vtfuse.data.jsonl import Record
from vtfuse.data.tokenizer import AnyTokenizer
from vtfuse.tasks.fields import check_captions
from vtfuse.tasks.spec import TaskSpec, register


def retrieval_items(record: Record, tokenizer: AnyTokenizer, cut: Truncation) -> list[Item]:
    """One item per caption, as an encoder reads it: no <bos>/<eos>, a slot for [CLS]."""
    return [
        (
            cut.fit(tokenizer.encode(caption), cut.max_length - 1, cut.where(record))
            or [tokenizer.unk_id],
            None,
        )
        for caption in record.captions
    ]


RETRIEVAL = register(
    TaskSpec(
        "retrieval",
        check_captions,
        retrieval_items,
        reads="caption",
        help="match images and texts (contrastive and image-text matching)",
        metrics=("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "itm_i2t_r1", "itm_t2i_r1"),
        headline="t2i_r1",
    )
)
