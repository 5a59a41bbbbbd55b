"""vtfuse: vision-text cross-attention fusion — give language models eyes.

The public API is small:

    vtfuse.load(path)                 a trained model for inference (`Pipeline`)
    vtfuse.train(task, train_jsonl, out, val_jsonl, model_config, train_config)
    vtfuse.evaluate(run, data_jsonl)
    vtfuse.create_model(ModelConfig(...))
    vtfuse.MultiHeadAttention         the attention core every part is built on
"""

__version__ = "0.1.0"

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Where each public name lives. `import vtfuse` loads none of them: a name's module is imported
# when it is first used (PEP 562), so the CLI, the server or a data script pays only for what
# it touches (the evaluation, training and plotting stacks are not loaded for a config).
_EXPORTS = {
    "MultiHeadAttention": "vtfuse.attention",
    "FusionConfig": "vtfuse.config",
    "LMConfig": "vtfuse.config",
    "ModelConfig": "vtfuse.config",
    "TextConfig": "vtfuse.config",
    "TrainConfig": "vtfuse.config",
    "VisionConfig": "vtfuse.config",
    "evaluate": "vtfuse.evaluation",
    "create_model": "vtfuse.models",
    "load_pretrained": "vtfuse.models",
    "Pipeline": "vtfuse.pipeline",
    "load": "vtfuse.pipeline",
    "train": "vtfuse.training",
}
__all__ = [
    "FusionConfig",
    "LMConfig",
    "ModelConfig",
    "MultiHeadAttention",
    "Pipeline",
    "TextConfig",
    "TrainConfig",
    "VisionConfig",
    "__version__",
    "create_model",
    "evaluate",
    "load",
    "load_pretrained",
    "train",
]

if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from vtfuse.attention import MultiHeadAttention
    from vtfuse.config import (
        FusionConfig,
        LMConfig,
        ModelConfig,
        TextConfig,
        TrainConfig,
        VisionConfig,
    )
    from vtfuse.evaluation import evaluate
    from vtfuse.models import create_model, load_pretrained
    from vtfuse.pipeline import Pipeline, load
    from vtfuse.training import train


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vtfuse' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
