"""Data: the JSONL dataset format, image preprocessing, the tokenizer and synthetic scenes.
A task's file is read with `vtfuse.tasks.read_jsonl(path, task)` (its lines checked by the task)."""

from vtfuse.data.images import ImageLoadError, load_image
from vtfuse.data.jsonl import DataError, Record, read_records
from vtfuse.data.tokenizer import Tokenizer

__all__ = ["DataError", "ImageLoadError", "Record", "Tokenizer", "load_image", "read_records"]
