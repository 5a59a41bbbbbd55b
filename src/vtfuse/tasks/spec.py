"""The task spec and its registry (the tasks themselves register in the modules beside this)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from vtfuse.config import TrainConfig
from vtfuse.data.items import Item, Truncation
from vtfuse.data.jsonl import Check, Record
from vtfuse.data.tokenizer import AnyTokenizer

ItemsOf = Callable[[Record, AnyTokenizer, Truncation], list[Item]]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    check: Check  # a line's task fields (and, if labelled, its target) → a problem, or None
    items: ItemsOf  # a line → the (token ids, class) items the model trains on
    reads: str  # the field the model reads: "caption" (or "captions"), "question", "text"
    label: str = ""  # the field holding a class to predict (its values are the classes)
    generates: bool = False  # a decoder writes text: the model learns from captions alone
    help: str = ""  # one line for the CLI
    # the metrics that rank models of this task (`vtfuse compare`'s columns, in order) and the
    # one its chart shows; none: compare does not take the task
    metrics: tuple[str, ...] = ()
    headline: str = ""
    # what a model of this task can be used as (pipelines, evaluators, the server); empty: the
    # task itself. A joint model captions and retrieves.
    serves: tuple[str, ...] = ()
    # The training schedule a run of this task gets unless told (`TrainConfig.batch_size`,
    # `.lr`). 3e-4, not 1e-3: measured on Sort-of-CLEVR from scratch (benchmarks/blindness.py),
    # at 1e-3 the VQA model's image tokens stop depending on the image (their spread across
    # images fell 10×, the vision gradient 400×, the attention went back to uniform)
    batch_size: int = 64
    lr: float = 3e-4

    @property
    def capabilities(self) -> tuple[str, ...]:
        return self.serves or (self.name,)

    def texts(self, record: Record) -> list[str]:
        """The texts of a line the tokenizer learns its words from."""
        return record.captions if self.reads == "caption" else [record.fields[self.reads]]


_SPECS: dict[str, TaskSpec] = {}


def register(spec: TaskSpec) -> TaskSpec:
    if spec.name in _SPECS:
        raise ValueError(f"task {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    return spec


def task_spec(name: str) -> TaskSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(
            f"unknown task {name!r}; choose one of: {', '.join(task_names())}"
        ) from None


def task_names() -> list[str]:
    """Every registered task, by name."""
    return sorted(_SPECS)


def ranked_tasks() -> list[str]:
    """The tasks whose spec names the metrics that rank models (what `vtfuse compare` takes)."""
    return [name for name in task_names() if _SPECS[name].metrics]


def text_to_class(reads: str, label: str) -> ItemsOf:
    """Items of a task that reads one text and predicts a class: the text as an encoder reads
    it (one position left for [CLS]) and the class of the `label` field; a class not seen in
    training is -1 (ignored by the loss, always wrong in accuracy)."""

    def items(record: Record, tokenizer: AnyTokenizer, cut: Truncation) -> list[Item]:
        text = tokenizer.encode(record.fields[reads])
        text = cut.fit(text, cut.max_length - 1, cut.where(record))
        return [(text, tokenizer.answer_id(record.fields.get(label, "")))]

    return items


def with_task_schedule(config: TrainConfig, task: str) -> TrainConfig:
    """`config` with the batch size and learning rate it leaves open (None) set to `task`'s."""
    spec = task_spec(task)
    return replace(
        config,
        batch_size=config.batch_size if config.batch_size is not None else spec.batch_size,
        lr=config.lr if config.lr is not None else spec.lr,
    )
