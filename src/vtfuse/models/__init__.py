"""Task models (caption, vqa, retrieval, classify, joint), built by name from a `ModelConfig`
(`create_model`) or loaded from a folder."""

from vtfuse.models.base import LM_TASKS, TASKS, CheckpointError, TaskModel
from vtfuse.models.captioner import Captioner
from vtfuse.models.factory import create_model, load_pretrained
from vtfuse.models.joint import JointModel
from vtfuse.models.pretrained_lm import LMCaptioner, LMPairClassifier, LMQuestionAnswerer
from vtfuse.models.retrieval import RetrievalModel
from vtfuse.models.vqa import VQAModel

__all__ = [
    "LM_TASKS",
    "TASKS",
    "Captioner",
    "CheckpointError",
    "JointModel",
    "LMCaptioner",
    "LMPairClassifier",
    "LMQuestionAnswerer",
    "RetrievalModel",
    "TaskModel",
    "VQAModel",
    "create_model",
    "load_pretrained",
]
