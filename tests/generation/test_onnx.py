"""The static decoding step and its ONNX export: the same tokens as the eager decoder."""

from __future__ import annotations

import builtins
import json
import shutil

import pytest
import torch

from tests.helpers import CAPTION_WORDS, random_images, require_module, shaken_captioner
from vtfuse.cli.main import main
from vtfuse.data.tokenizer import Tokenizer
from vtfuse.generation import beam_search, greedy
from vtfuse.generation.onnx import MANIFEST, OnnxDecoder, export_onnx, onnxruntime
from vtfuse.generation.runtimes import choose_runtime
from vtfuse.generation.static import StaticDecoder, supports
from vtfuse.pipeline import Pipeline
from vtfuse.weights import CheckpointError


@pytest.mark.parametrize("fusion", ["cross_attention", "gated_cross_attention", "similarity"])
def test_the_static_step_decodes_the_eager_tokens(fusion):
    model = shaken_captioner(fusion)
    static = StaticDecoder(model)
    pictures = random_images()
    eager = greedy(model, pictures, 20, bos_id=1, eos_id=-1).tokens
    assert greedy(static, pictures, 20, bos_id=1, eos_id=-1).tokens == eager
    assert len({tuple(t) for t in eager}) > 1  # the images lead to different captions
    beams = beam_search(model, pictures, 3, 12, bos_id=1, eos_id=2).tokens
    assert beam_search(static, pictures, 3, 12, bos_id=1, eos_id=2).tokens == beams


@pytest.mark.parametrize(
    ("fusion", "text", "reason"),
    [
        ("co_attention", {}, "changes with the text"),
        ("concat", {}, "single-stream"),
        ("cross_attention", {"encoder": "lstm"}, "learned positions"),
    ],
)
def test_a_decoder_without_a_static_step_says_why(fusion, text, reason):
    model = shaken_captioner(fusion, **text)
    assert reason in supports(model)
    with pytest.raises(ValueError, match=reason):
        StaticDecoder(model)


@pytest.fixture
def exported(tmp_path):
    """A tiny captioner saved as a model folder, and its ONNX export."""
    require_module("onnxruntime")
    tokenizer = Tokenizer.build([CAPTION_WORDS])
    model = shaken_captioner("gated_cross_attention", vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "model", tokenizer)
    return tmp_path / "model", export_onnx(model, tmp_path / "onnx", tmp_path / "model")


def test_onnx_runtime_decodes_the_eager_tokens(exported):
    model_folder, onnx_folder = exported
    eager = Pipeline.load(model_folder, device="cpu", runtime="torch")
    onnx = Pipeline.load(onnx_folder, device="cpu")  # auto: the folder has graphs
    assert (eager.runtime, onnx.runtime) == ("torch", "onnx")
    pictures = random_images(4)
    for beam in (1, 3):
        expected = eager.generate(pictures, beam_size=beam).tokens
        assert onnx.generate(pictures, beam_size=beam).tokens == expected
    with_maps = onnx.generate(pictures[:1], need_weights=True)  # maps: PyTorch decodes
    assert with_maps.tokens == eager.generate(pictures[:1]).tokens and with_maps.attention


def test_int8_graphs_stay_within_a_tenth_of_the_fp32_logits(exported):
    """ONNX Runtime's dynamic int8 (per-channel weight scales) against the fp32 graph on the
    first step of four captions (later steps add up the differences of the caches). The bound
    is loose for a random 32-wide model with every weight pushed off its initialisation; on
    trained models see benchmarks/results/onnx_quickstart.json."""
    _, onnx_folder = exported
    pictures, first = random_images(4), torch.ones(4, 1, dtype=torch.long)
    logits = {}
    for weights in ("fp32", "int8"):
        decoder = OnnxDecoder(onnx_folder, weights)
        logits[weights], _ = decoder.step(first, None, decoder.start(pictures)[1])
    error = (logits["int8"] - logits["fp32"]).abs().max()
    assert 0 < error <= 0.1 * logits["fp32"].abs().max()
    assert Pipeline.load(onnx_folder, device="cpu", weights="int8").runtime == "onnx"


def test_the_cli_exports_and_captions_with_either_runtime(exported, tmp_path, capsys):
    model_folder, _ = exported
    out = tmp_path / "cli-onnx"
    assert main(["export", str(model_folder), "--onnx", str(out)]) == 0
    assert (out / MANIFEST).is_file() and (out / "config.json").is_file()
    picture = tmp_path / "picture.png"
    from PIL import Image

    Image.fromarray(random_images(1)[0].permute(1, 2, 0).numpy()).save(picture)
    captions = []
    for runtime in ("torch", "onnx"):
        capsys.readouterr()
        assert main(["caption", str(out), str(picture), "--runtime", runtime]) == 0
        captions.append(capsys.readouterr().out)
    assert captions[0] == captions[1] != ""


def test_runtime_choice_and_its_errors(exported, tmp_path, monkeypatch):
    model_folder, onnx_folder = exported
    cpu = torch.device("cpu")
    assert choose_runtime("auto", model_folder, cpu, "fp32") == "torch"  # no graphs
    assert choose_runtime("auto", onnx_folder, cpu, "int8") == "onnx"  # its int8 graph
    assert choose_runtime("auto", onnx_folder, torch.device("cuda"), "fp32") == "torch"
    with pytest.raises(ValueError, match="on the CPU, not fp32 weights on cuda"):
        choose_runtime("onnx", onnx_folder, torch.device("cuda"), "fp32")
    with pytest.raises(CheckpointError, match="vtfuse export RUN --onnx"):
        Pipeline.load(model_folder, device="cpu", runtime="onnx")
    older = tmp_path / "older"
    shutil.copytree(onnx_folder, older)
    manifest = json.loads((older / MANIFEST).read_text())
    (older / MANIFEST).write_text(json.dumps({**manifest, "format": 1}))
    with pytest.raises(CheckpointError, match=r"onnx\.json: graphs of format 1.*export them again"):
        OnnxDecoder(older)

    real_import = builtins.__import__

    def without_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_onnxruntime)
    with pytest.raises(ImportError, match=r'pip install -c constraints.txt -e "\.\[onnx\]"'):
        onnxruntime()
    assert choose_runtime("auto", onnx_folder, cpu, "fp32") == "torch"
