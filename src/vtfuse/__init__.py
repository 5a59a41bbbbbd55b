"""vtfuse: vision-text cross-attention fusion — give language models eyes.

The public API is small:

    vtfuse.load(path)                 a trained model for inference (`Pipeline`)
    vtfuse.train(task, train_jsonl, out, val_jsonl, model_config, train_config)
    vtfuse.evaluate(run, data_jsonl)
    vtfuse.create_model(ModelConfig(...))
    vtfuse.MultiHeadAttention         the attention core every part is built on
"""

__version__ = "0.1.0"

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
