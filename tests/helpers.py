"""What several test modules share (no test module imports another): tiny models and pipelines,
and what a test needs beyond vtfuse's own dependencies: a program (Chromium, Java) or an
optional package (schemathesis, FastAPI, transformers, PyAV, ...).

Missing, the test skips with the reason where a developer runs it, but fails where
`VTFUSE_CI=1` (set by `.ci/run`): CI installs every tool, so a missing one means the CI machine
tests less than it says, which must turn it red, not leave it green with a skip. A module that
cannot even be imported without the tool fails at collection there, which stops the run."""

from __future__ import annotations

import importlib
import os
import shutil
from dataclasses import replace
from types import ModuleType
from typing import NoReturn

import pytest
import torch

from vtfuse.config import FusionConfig, ModelConfig, TextConfig, VisionConfig
from vtfuse.data.tokenizer import Tokenizer
from vtfuse.models.factory import create_model
from vtfuse.pipeline import Pipeline

CI_VARIABLE = "VTFUSE_CI"


def in_ci() -> bool:
    """Read each time, not at import: a test may set it for a run it starts."""
    return os.environ.get(CI_VARIABLE) == "1"


def missing(what: str) -> NoReturn:
    """Skip the test (or the module, at its top) for want of `what`; fail it in CI."""
    if in_ci():
        pytest.fail(f"{what} ({CI_VARIABLE}=1: CI runs every test, install it)", pytrace=False)
    pytest.skip(what, allow_module_level=True)


def require_module(name: str) -> ModuleType:
    """`pytest.importorskip(name)` that fails in CI."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        missing(f"needs the Python package {name.split('.')[0]} ({error})")


def require_tool(*commands: str) -> None:
    """Programs the test runs, looked up on PATH."""
    absent = [command for command in commands if shutil.which(command) is None]
    if absent:
        missing(f"needs {' and '.join(absent)} on PATH")


def has_tool(command: str) -> bool:
    """For a test that checks more when `command` is there: in CI it must be."""
    if shutil.which(command) is None and in_ci():
        missing(f"needs {command} on PATH")
    return shutil.which(command) is not None


# -- tiny models ---------------------------------------------------------------------------------
TINY_VISION = VisionConfig(image_size=24, channels=(8, 8, 16), dim=32, depth=0, heads=2)
RETRIEVAL_CONFIG = ModelConfig(
    task="retrieval",
    vision=TINY_VISION,
    text=TextConfig(vocab_size=20, dim=32, depth=2, heads=2, max_length=16),
)
WORDS = ["a", "red", "blue", "circle", "square", "what", "colour", "is", "the", "."]


CAPTION_WORDS = "a red blue green circle square at the top left right center ."
DECODER_TEXT = TextConfig(vocab_size=40, dim=32, depth=2, heads=2, max_length=24)


def shaken_captioner(fusion: str = "cross_attention", **text) -> torch.nn.Module:
    """A random tiny captioner whose every part matters: each weight moved by N(0, 0.5²) off
    its initialisation (gates open), so the captions differ from image to image and word to
    word, and a wrong decoding step would show (the exported and compiled decoders' tests)."""
    torch.manual_seed(0)
    text_config = replace(DECODER_TEXT, **text)
    config = ModelConfig(vision=TINY_VISION, text=text_config, fusion=FusionConfig(fusion))
    model = create_model(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    return model.eval()


def random_images(count: int = 3) -> torch.Tensor:
    """uint8 images (count, 3, 24, 24) for TINY_VISION, the same every call."""
    shape = (count, 3, 24, 24)
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(1)).byte()


def tiny_pipeline(task: str) -> Pipeline:
    """A random tiny model of `task` (answers red, blue, green) behind a CPU pipeline."""
    torch.manual_seed(0)
    tokenizer = Tokenizer.build([" ".join(WORDS)], answers=["red", "blue", "green"])
    text = TextConfig(vocab_size=len(tokenizer), dim=32, depth=2, heads=2, max_length=16)
    model = create_model(ModelConfig(task=task, vision=TINY_VISION, text=text, num_answers=3))
    return Pipeline(model, tokenizer, torch.device("cpu"))


# -- tiny pretrained LMs, saved as a hub model is (offline) ------------------------------------
TINY_VOCAB = 64
TINY_LMS = {
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=3, n_head=2, n_positions=64)),
    "llama": ("LlamaConfig", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64,
    )),
    "qwen2": ("Qwen2Config", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64,
    )),
    "mistral": ("MistralConfig", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64,
    )),
    "phi": ("PhiConfig", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        max_position_embeddings=64,
    )),
    "gpt_neox": ("GPTNeoXConfig", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        max_position_embeddings=64,
    )),
    "bert": ("BertConfig", dict(  # a BERT decoder: causal mask, LM head (as BLIP's)
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        max_position_embeddings=64, is_decoder=True,
    )),
}  # fmt: skip
TINY_SPECIALS = ["<pad>", "<bos>", "<eos>", "<image>", "<unk>"]  # ids 0..4


def save_tiny_lm(family: str, folder):
    """A random `family` LM and a word-level tokenizer of the synthetic scenes' words."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from vtfuse.data.synth import COLOURS, POSITIONS, SHAPES

    words = [*COLOURS, *SHAPES, *(w for p in POSITIONS for w in p.split()), "a", "the", "in"]
    words += ["is", "of", "and", "there", ".", ","]
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*TINY_SPECIALS, *words]))}
    assert len(vocab) <= TINY_VOCAB
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip
    config_class, sizes = TINY_LMS[family]
    config = getattr(transformers, config_class)(
        vocab_size=TINY_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, **sizes
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
