"""Captioning: {"image": ..., "caption": "..."} or {"image": ..., "captions": ["...", ...]}.
The model writes the caption: one item per reference, <bos> words <eos>."""

from __future__ import annotations

from vtfuse.data.items import Item, Truncation
from vtfuse.data.jsonl import Record
from vtfuse.data.tokenizer import AnyTokenizer
from vtfuse.tasks.fields import check_captions
from vtfuse.tasks.spec import TaskSpec, register


def caption_items(record: Record, tokenizer: AnyTokenizer, cut: Truncation) -> list[Item]:
    """One item per reference caption: <bos> words <eos> (a caption cut short has no <eos>)."""
    return [
        (
            cut.fit(
                tokenizer.encode(caption, bos=True, eos=True), cut.max_length, cut.where(record)
            ),
            None,
        )
        for caption in record.captions
    ]


CAPTION = register(
    TaskSpec(
        "caption",
        check_captions,
        caption_items,
        reads="caption",
        generates=True,
        help="describe an image in words (a decoder cross-attends to the image)",
        metrics=("cider", "bleu4", "meteor", "object_f1", "pointing_accuracy"),
        headline="cider",
        # A decoder learns to look in a quarter of the time at 32 captions a step and 1e-3:
        # the default captioner on the quickstart's scenes, 6 epochs from scratch, object F1
        # 0.291 at (64, 3e-4), 0.590 at (64, 1e-3), 0.996 at (32, 1e-3) (benchmarks/schedule.py)
        batch_size=32,
        lr=1e-3,
    )
)
