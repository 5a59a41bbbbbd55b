"""Data: the JSONL dataset format, image preprocessing, the tokenizer and synthetic scenes."""

from vtfuse.data.dataset import DataError, Record, read_jsonl
from vtfuse.data.images import ImageLoadError, load_image
from vtfuse.data.tokenizer import Tokenizer

__all__ = ["DataError", "ImageLoadError", "Record", "Tokenizer", "load_image", "read_jsonl"]
