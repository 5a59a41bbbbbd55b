"""Joint training (BLIP-style): captioning and retrieval from one file of captioned images. The
items are the caption task's; the encoder reads them through `data.items.encoder_view`."""

from __future__ import annotations

from vtfuse.tasks.caption import CAPTION, caption_items
from vtfuse.tasks.fields import check_captions
from vtfuse.tasks.retrieval import RETRIEVAL
from vtfuse.tasks.spec import TaskSpec, register

JOINT = register(
    TaskSpec(
        "joint",
        check_captions,
        caption_items,
        reads="caption",
        generates=True,
        help="caption and retrieve with one model (contrastive, matching and captioning losses)",
        serves=(CAPTION.name, RETRIEVAL.name),
    )
)
