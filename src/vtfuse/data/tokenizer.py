"""Tokenizers: vtfuse's word-level one, built from the training text with the VQA answer
vocabulary; and a pretrained LM's own tokenizer behind the same interface."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def split_words(text: str) -> list[str]:
    """Lower-case words, numbers and single punctuation marks.

    "A red, Circle." → ["a", "red", ",", "circle", "."]
    """
    return _WORD.findall(text.lower())


def normalise_answer(answer: str) -> str:
    return " ".join(split_words(answer)).strip()


class Tokenizer:
    """Words ↔ ids (ids 0..3 are <pad>, <bos>, <eos>, <unk>); answers ↔ class ids for VQA."""

    FILE = "tokenizer.json"

    def __init__(self, words: list[str], answers: list[str] | None = None):
        if list(words[: len(SPECIALS)]) != list(SPECIALS):
            raise ValueError(f"a vocabulary must start with {SPECIALS}")
        self.words = list(words)
        self.word_ids = {w: i for i, w in enumerate(self.words)}
        self.answers = list(answers or [])
        self.answer_ids = {a: i for i, a in enumerate(self.answers)}

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(
        cls, texts: Iterable[str], answers: Iterable[str] = (), min_count: int = 1
    ) -> Tokenizer:
        counts = Counter(w for text in texts for w in split_words(text))
        words = sorted(w for w, n in counts.items() if n >= min_count)
        answer_list = sorted({normalise_answer(a) for a in answers})
        return cls([*SPECIALS, *words], answer_list)

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [self.word_ids.get(w, self.unk_id) for w in split_words(text)]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def tokens(self, ids: Iterable[int]) -> list[str]:
        """The words of `ids` up to the first <eos>, special tokens left out."""
        words = []
        for i in ids:
            if i == self.eos_id:
                break
            if i >= len(SPECIALS):
                words.append(self.words[i])
        return words

    def decode(self, ids: Iterable[int]) -> str:
        return re.sub(r" ([,.;:?!])", r"\1", " ".join(self.tokens(ids)))

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """Each id's text, specials included: the labels of attention pictures."""
        return [self.words[i] for i in ids]

    def answer_id(self, answer: str) -> int:
        """Class id of an answer, or -1 for an answer never seen in training."""
        return self.answer_ids.get(normalise_answer(answer), -1)

    def save(self, folder: str | Path) -> None:
        data = {"words": self.words, "answers": self.answers}
        (Path(folder) / self.FILE).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> Tokenizer:
        data = json.loads((Path(folder) / cls.FILE).read_text())
        return cls(data["words"], data.get("answers"))


class LMTokenizer:
    """A pretrained LM's tokenizer (transformers) with the word tokenizer's interface.

    Captions are wrapped in the LM's own start and end tokens: BOS/EOS where it has them
    (GPT-2, Llama), [CLS]/[SEP] for a BERT-family decoder."""

    FOLDER = "lm_tokenizer"  # inside a model folder, beside vtfuse's own files
    ANSWERS = "answers.json"  # a VQA model's answer classes

    def __init__(self, hf, answers: list[str] | None = None):
        self.hf = hf
        self.answers = list(answers or [])
        self.answer_ids = {a: i for i, a in enumerate(self.answers)}
        self.bos_id = _first_id(hf, "bos_token_id", "cls_token_id", "eos_token_id")
        self.eos_id = _first_id(hf, "eos_token_id", "sep_token_id")
        self.pad_id = _first_id(hf, "pad_token_id", "eos_token_id", "sep_token_id")
        self.unk_id = _first_id(hf, "unk_token_id", "eos_token_id", "sep_token_id")

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, answers=None) -> LMTokenizer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(name_or_path)), answers)

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.hf.decode(ids, skip_special_tokens=True).strip()

    def pieces(self, ids: Iterable[int]) -> list[str]:
        return [self.hf.decode([i]).strip() for i in ids]

    def answer_id(self, answer: str) -> int:
        return self.answer_ids.get(normalise_answer(answer), -1)

    def save(self, folder: str | Path) -> None:
        path = Path(folder) / self.FOLDER
        self.hf.save_pretrained(str(path))
        (path / self.ANSWERS).write_text(json.dumps(self.answers, indent=1) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> LMTokenizer:
        path = Path(folder) / cls.FOLDER
        answers = path / cls.ANSWERS
        return cls.from_pretrained(
            path, json.loads(answers.read_text()) if answers.is_file() else []
        )


def _first_id(hf, *names: str) -> int:
    for name in names:
        value = getattr(hf, name, None)
        if value is not None:
            return value
    raise ValueError(f"{type(hf).__name__} has none of {', '.join(names)}")


AnyTokenizer = Tokenizer | LMTokenizer


def load_tokenizer(folder: str | Path) -> AnyTokenizer:
    """The tokenizer saved in a model folder, whichever kind it is."""
    if (Path(folder) / LMTokenizer.FOLDER).is_dir():
        return LMTokenizer.load(folder)
    return Tokenizer.load(folder)
