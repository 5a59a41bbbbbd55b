"""The decoder compiled ahead of time (AOTInductor): the eager tokens, cached on disk, checked."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from tests.helpers import CAPTION_WORDS, random_images, shaken_captioner
from vtfuse.cli.main import main
from vtfuse.data.tokenizer import Tokenizer
from vtfuse.generation import compiled as compiled_module
from vtfuse.generation.compiled import CACHE, MANIFEST, CompiledDecoder, current_packages
from vtfuse.generation.runtimes import choose_runtime
from vtfuse.pipeline import Pipeline
from vtfuse.weights import CheckpointError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny captioner saved as a model folder, and `vtfuse export --compiled` of it."""
    root = tmp_path_factory.mktemp("compiled")
    tokenizer = Tokenizer.build([CAPTION_WORDS])
    model = shaken_captioner("gated_cross_attention", vocab_size=len(tokenizer))
    model.save_pretrained(root / "model", tokenizer)
    assert main(["export", str(root / "model"), "--compiled", str(root / "out")]) == 0
    return root / "model", root / "out"


def test_compiled_packages_decode_the_eager_tokens(exported):
    model_folder, out = exported
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["torch"] == torch.__version__ and manifest["compile_seconds"] > 0
    assert (out / "config.json").is_file()  # an export is a whole model folder
    eager = Pipeline.load(model_folder, device="cpu", runtime="torch")
    fast = Pipeline.load(out, device="cpu")  # auto: the folder has packages for this torch
    assert (eager.runtime, fast.runtime) == ("torch", "compiled")
    pictures = random_images(5)
    for beam in (1, 3):  # beam search reorders the caches and reads strided token columns
        expected = eager.generate(pictures, beam_size=beam).tokens
        assert fast.generate(pictures, beam_size=beam).tokens == expected
    assert len({tuple(t) for t in expected}) > 1
    one = fast.generate(pictures[:1]).tokens  # another batch size, the same packages
    assert one == eager.generate(pictures[:1]).tokens
    with_maps = fast.generate(pictures[:1], need_weights=True)  # maps: PyTorch decodes
    assert with_maps.tokens == one and with_maps.attention


def test_compile_flag_compiles_once_into_the_model_folder(exported, tmp_path, capsys, monkeypatch):
    model_folder, _ = exported
    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    picture = tmp_path / "picture.png"
    Image.fromarray(random_images(1)[0].permute(1, 2, 0).numpy()).save(picture)
    assert choose_runtime("auto", folder, CPU, "fp32") == "torch"  # nothing compiled yet

    assert main(["caption", str(folder), str(picture), "--compile"]) == 0
    compiled_caption = capsys.readouterr().out
    assert (folder / CACHE / MANIFEST).is_file()
    assert main(["caption", str(folder), str(picture), "--runtime", "torch"]) == 0
    assert capsys.readouterr().out == compiled_caption != ""

    def no_second_compile(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(compiled_module, "export_compiled", no_second_compile)
    assert Pipeline.load(folder, device="cpu", runtime="compiled").runtime == "compiled"
    assert choose_runtime("auto", folder, CPU, "fp32") == "compiled"  # from its cache
    assert choose_runtime("auto", folder, CPU, "int8") == "torch"  # packages are fp32

    model = Pipeline.load(folder, device="cpu", runtime="torch").model  # retrained weights:
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(folder, Tokenizer.build([CAPTION_WORDS]))
    assert current_packages(folder, CPU) is None  # the cache is of the old weights
    assert choose_runtime("auto", folder, CPU, "fp32") == "torch"


def test_packages_of_another_build_are_refused_by_name(exported, tmp_path):
    _, out = exported
    other = tmp_path / "other"
    shutil.copytree(out, other)
    manifest = json.loads((other / MANIFEST).read_text())
    (other / MANIFEST).write_text(json.dumps({**manifest, "torch": "1.0.0"}))
    with pytest.raises(CheckpointError, match=r"compiled\.json: packages built for .*torch 1\.0"):
        CompiledDecoder(other, CPU)
    assert choose_runtime("auto", other, CPU, "fp32") == "torch"
    assert choose_runtime("auto", out, torch.device("cuda"), "fp32") == "torch"  # built for cpu
    with pytest.raises(ValueError, match="fp32 weights it was compiled with, not int8"):
        choose_runtime("compiled", out, CPU, "int8")
    with pytest.raises(CheckpointError, match="vtfuse export RUN --compiled"):
        CompiledDecoder(tmp_path, CPU)


def test_no_cpp_compiler_is_a_clear_error(monkeypatch):
    from torch._inductor import cpp_builder

    def none_found():
        raise RuntimeError("No working C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", none_found)
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler: install g\\+\\+"):
        compiled_module.export_compiled(shaken_captioner(), "unused")
