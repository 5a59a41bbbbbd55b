"""Shared test set-up: tiny tensors run faster on one intra-op thread, and are then immune to
whatever else the machine is doing."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Tiny random language models of seven families, each saved with `save_pretrained` and a
# word-level tokenizer, so tests load them through the same path a hub name takes.
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


@pytest.fixture(scope="session", params=sorted(TINY_LMS))
def lm_folder(request, tmp_path_factory):
    return save_tiny_lm(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def gpt2_folder(tmp_path_factory):
    return save_tiny_lm("gpt2", tmp_path_factory.mktemp("gpt2"))


def pickle_only_copy(folder: Path, to: Path) -> Path:
    """A copy of the `save_pretrained` folder `folder` at `to` whose weights are only
    pytorch_model.bin (torch.save), as older hub models have: transformers 5 writes
    safetensors even when asked `safe_serialization=False`."""
    shutil.copytree(folder, to)
    torch.save(load_file(to / "model.safetensors"), to / "pytorch_model.bin")
    (to / "model.safetensors").unlink()
    return to


@pytest.fixture
def pickle_only(tmp_path):
    """`pickle_only(folder)`: `pickle_only_copy` of `folder` in the test's tmp_path."""
    return lambda folder: pickle_only_copy(Path(folder), tmp_path / f"pickled-{Path(folder).name}")


@pytest.fixture(scope="session")
def pickled_gpt2_folder(gpt2_folder, tmp_path_factory):
    return pickle_only_copy(gpt2_folder, tmp_path_factory.mktemp("pickled") / "gpt2")
