"""Checkpoints: atomic folders, exact training state, and save/load of task models."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vtfuse.config import (
    FORMAT_VERSION,
    ConfigError,
    ModelConfig,
    TextConfig,
    TrainConfig,
    VisionConfig,
)
from vtfuse.data.tokenizer import Tokenizer
from vtfuse.models import CheckpointError, create_model, load_pretrained
from vtfuse.models.warm_start import warm_start
from vtfuse.training.checkpoint import (
    STATE_JSON,
    STATE_TENSORS,
    atomic_folder,
    load_training_state,
    recover,
    save_training_state,
)
from vtfuse.training.optim import make_optimizer, warmup_cosine

VISION = VisionConfig(image_size=24, channels=(8, 8, 16), dim=32, depth=1, heads=2)


def tiny_config(task: str) -> ModelConfig:
    return ModelConfig(
        task=task,
        vision=VISION,
        text=TextConfig(vocab_size=20, dim=32, depth=2, heads=2, max_length=16),
        num_answers=5 if task == "vqa" else 0,
    )


def tokenizer() -> Tokenizer:
    return Tokenizer.build(
        ["a red square.", "a blue circle?"], answers=["yes", "no", "2", "1", "0"]
    )


def batch(task: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 20, (3, 6), generator=g)
    tokens[2, 4:] = 0
    out = {
        "images": torch.randint(0, 256, (2, 3, 24, 24), generator=g, dtype=torch.uint8),
        "image_index": torch.tensor([0, 1, 1]),
        "token_mask": tokens != 0,
    }
    if task == "vqa":
        out.update(tokens=tokens, answers=torch.tensor([0, 4, 2]))
    else:
        tokens[:, 0] = 1
        out["tokens"] = tokens
    return out


def write_tree(folder, files: dict[str, str]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def read_tree(folder) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.iterdir()}


# -- atomic_folder / recover -------------------------------------------------------------------
def test_atomic_folder_replaces_target_on_success(tmp_path):
    target = tmp_path / "last"
    write_tree(target, {"a.txt": "old", "stale.txt": "gone soon"})
    with atomic_folder(target) as folder:
        assert folder != target and folder.parent == tmp_path
        assert read_tree(target) == {"a.txt": "old", "stale.txt": "gone soon"}  # untouched so far
        (folder / "a.txt").write_text("new")
    assert read_tree(target) == {"a.txt": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no .last.tmp / .last.old left


def test_atomic_folder_creates_a_new_target(tmp_path):
    target = tmp_path / "best"
    with atomic_folder(target) as folder:
        (folder / "x").write_text("1")
    assert read_tree(target) == {"x": "1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_atomic_folder_keeps_old_target_when_the_block_raises(tmp_path):
    target = tmp_path / "last"
    write_tree(target, {"a.txt": "old"})

    class Boom(Exception):
        pass

    with pytest.raises(Boom), atomic_folder(target) as folder:
        (folder / "a.txt").write_text("half-written")
        raise Boom
    assert read_tree(target) == {"a.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_atomic_folder_clears_a_stale_temporary(tmp_path):
    target = tmp_path / "last"
    write_tree(tmp_path / ".last.tmp", {"junk": "from a crash"})
    with atomic_folder(target) as folder:
        assert list(folder.iterdir()) == []
        (folder / "ok").write_text("1")
    assert read_tree(target) == {"ok": "1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_recover(tmp_path):
    target = tmp_path / "last"
    assert recover(target) is None
    write_tree(tmp_path / ".last.old", {"a": "previous"})
    assert recover(target) == tmp_path / ".last.old"  # crash between the two renames
    write_tree(target, {"a": "current"})
    assert recover(target) == target
    assert recover(str(target)) == target


# -- training state ----------------------------------------------------------------------------
def make_training(seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(tiny_config("caption"))
    config = TrainConfig(lr=1e-2)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(10, config))
    return model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, steps: int, seed: int = 0):
    for i in range(steps):
        loss = model.training_loss(batch("caption", seed + i))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def test_training_state_round_trip(tmp_path):
    model, optimizer, scheduler = make_training()
    train_steps(model, optimizer, scheduler, 2)
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    progress = {"step": 2, "epoch": 0, "batch_in_epoch": 2, "best_val_loss": 1.5}
    save_training_state(tmp_path, optimizer, scheduler, progress)
    assert (tmp_path / STATE_TENSORS).is_file() and (tmp_path / STATE_JSON).is_file()
    after_save = (torch.rand(4), random.random(), np.random.rand(3))

    # a fresh model / optimiser / scheduler with the same parameters, and scrambled RNGs
    fresh_model, fresh_optimizer, fresh_scheduler = make_training()
    fresh_model.load_state_dict(model.state_dict())
    assert fresh_scheduler.last_epoch == 0
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    restored = load_training_state(tmp_path, fresh_optimizer, fresh_scheduler)
    assert restored == progress

    # RNG: the same numbers come out as right after saving
    after_load = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(after_load[0], after_save[0])
    assert after_load[1] == after_save[1]
    np.testing.assert_array_equal(after_load[2], after_save[2])

    # optimiser: every state tensor and hyper-parameter equal
    original, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert original["state"].keys() == loaded["state"].keys()
    assert len(original["state"]) == len(list(model.parameters()))  # every parameter has moments
    for index, slots in original["state"].items():
        assert slots.keys() == loaded["state"][index].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for name, value in slots.items():
            assert torch.equal(value, loaded["state"][index][name]), (index, name)
    for group, loaded_group in zip(original["param_groups"], loaded["param_groups"], strict=True):
        assert {k: v for k, v in group.items() if k != "betas"} == {
            k: v for k, v in loaded_group.items() if k != "betas"
        }
        assert tuple(group["betas"]) == tuple(loaded_group["betas"])

    # scheduler: same position and learning rates
    assert fresh_scheduler.last_epoch == scheduler.last_epoch == 2
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    assert [g["lr"] for g in fresh_optimizer.param_groups] == [
        g["lr"] for g in optimizer.param_groups
    ]

    # and training continues identically (each from the restored generator: dropout draws)
    restored_rng = torch.get_rng_state()
    train_steps(model, optimizer, scheduler, 1, seed=10)
    torch.set_rng_state(restored_rng)
    train_steps(fresh_model, fresh_optimizer, fresh_scheduler, 1, seed=10)
    for (name, a), b in zip(
        model.state_dict().items(), fresh_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_training_state_of_a_fresh_optimizer(tmp_path):
    _, optimizer, scheduler = make_training()
    save_training_state(tmp_path, optimizer, scheduler, {"step": 0})
    _, other_optimizer, other_scheduler = make_training()
    assert load_training_state(tmp_path, other_optimizer, other_scheduler) == {"step": 0}
    assert other_optimizer.state_dict()["state"] == {}


# -- save_pretrained / load_pretrained ---------------------------------------------------------
@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_save_and_load_pretrained(tmp_path, task):
    torch.manual_seed(0)
    model = create_model(tiny_config(task)).eval()
    tok = tokenizer()
    model.save_pretrained(tmp_path / "model", tok)
    assert {p.name for p in (tmp_path / "model").iterdir()} == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    }
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["format_version"] == FORMAT_VERSION and config["model"]["task"] == task

    torch.manual_seed(1)  # a different random init, replaced by the saved weights
    loaded, loaded_tok = load_pretrained(tmp_path / "model")
    assert type(loaded) is type(model)
    assert loaded.config == model.config
    assert not loaded.training
    assert loaded_tok.words == tok.words and loaded_tok.answers == tok.answers
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    if task == "caption":
        assert loaded.lm_head.weight is loaded.text.token_embedding.weight  # still tied

    data = batch(task)
    with torch.no_grad():
        if task == "vqa":
            expected, _ = model(
                data["images"], data["tokens"], data["token_mask"], data["image_index"]
            )
            actual, _ = loaded(
                data["images"], data["tokens"], data["token_mask"], data["image_index"]
            )
        else:
            expected, _ = model(data["images"], data["tokens"], data["image_index"])
            actual, _ = loaded(data["images"], data["tokens"], data["image_index"])
    assert torch.equal(expected, actual)


def saved_folder(tmp_path, task="caption"):
    torch.manual_seed(0)
    folder = tmp_path / "model"
    words = tokenizer()
    config = tiny_config(task)
    text = dataclasses.replace(config.text, vocab_size=len(words))  # as `vtfuse train` builds it
    create_model(dataclasses.replace(config, text=text)).save_pretrained(folder, words)
    return folder


def test_wrong_format_version_is_refused(tmp_path):
    folder = saved_folder(tmp_path)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["format_version"] = 99
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        load_pretrained(folder)
    assert "'format_version'" in str(info.value)
    assert "99" in str(info.value) and str(path) in str(info.value)
    del config["format_version"]
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'format_version' is None"):
        load_pretrained(folder)


def test_format_2_checkpoint_is_upgraded_on_load(tmp_path):
    """Format 2 stored every attention/MLP weight as nn.Linear's (out, in), the position table
    as `text.position_embedding`, and had no recurrent-encoder fields; format 3 stores the
    weights input-major, under `text.context.`. A format-2 folder loads into the same model."""
    from safetensors.torch import load_file, save_file

    from vtfuse.linear import Linear

    folder = saved_folder(tmp_path)
    model, _ = load_pretrained(folder)
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Linear)}
    weights = load_file(folder / "model.safetensors")
    assert linear and linear <= set(weights)
    old = {n: t.t().contiguous() if n in linear else t for n, t in weights.items()}
    old["text.position_embedding.weight"] = old.pop("text.context.position_embedding.weight")
    save_file(old, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    for field in ("encoder", "rnn_layers", "rnn_hidden", "bidirectional"):
        del config["model"]["text"][field]
    (folder / "config.json").write_text(json.dumps({**config, "format_version": 2}))
    upgraded, _ = load_pretrained(folder)
    for name, tensor in upgraded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    images = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(upgraded.encode_image(images), model.encode_image(images))


def test_format_3_cnn_checkpoint_is_upgraded_on_load(tmp_path):
    """Format 3's CNN encoders had no pixel shortcut (and their configs no such field); a
    format-3 folder loads into a format-4 model that computes the same thing."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    old = dataclasses.replace(VISION, pixel_shortcut=False)
    model = create_model(dataclasses.replace(tiny_config("vqa"), vision=old)).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder, tokenizer())
    config = json.loads((folder / "config.json").read_text())
    del config["model"]["vision"]["pixel_shortcut"]
    (folder / "config.json").write_text(json.dumps({**config, "format_version": 3}))
    assert not any("pixel_shortcut" in name for name in load_file(folder / "model.safetensors"))

    upgraded, _ = load_pretrained(folder)
    assert upgraded.config.vision.pixel_shortcut
    assert upgraded.vision.pixel_shortcut.weight.abs().sum() == 0
    data = batch("vqa")
    with torch.no_grad():
        want = model(data["images"], data["tokens"], data["token_mask"], data["image_index"])
        got = upgraded(data["images"], data["tokens"], data["token_mask"], data["image_index"])
    torch.testing.assert_close(got[0], want[0])


def test_unknown_config_field_is_refused(tmp_path):
    folder = saved_folder(tmp_path, "vqa")
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["model"]["text"]["rotary"] = True
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError) as info:
        load_pretrained(folder)
    assert "rotary" in str(info.value)
    assert str(path) in str(info.value)


def test_invalid_json_config_is_refused(tmp_path):
    folder = saved_folder(tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_pretrained(folder)


def pickled_folder(tmp_path, name: str = "pytorch_model.bin") -> Path:
    """A saved captioner whose weights were written by torch.save instead of safetensors."""
    folder = saved_folder(tmp_path)
    model, _ = load_pretrained(folder)
    torch.save(model.trainable_state_dict(), folder / name)
    (folder / "model.safetensors").unlink()
    return folder


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "run.ckpt"])
def test_pickle_weights_are_refused_naming_the_file_and_the_way_in(tmp_path, name):
    folder = pickled_folder(tmp_path, name)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(folder)
    message = str(info.value)
    assert str(folder / name) in message and "model.safetensors" in message
    assert "pickle" in message and "run any code" in message  # why
    assert "--allow-pickle" in message and "allow_pickle=True" in message  # how to opt in


def test_allow_pickle_loads_the_same_weights(tmp_path):
    folder = pickled_folder(tmp_path)
    expected, _ = load_pretrained(saved_folder(tmp_path / "again"))
    loaded, _ = load_pretrained(folder, allow_pickle=True)
    for (name, a), b in zip(
        expected.state_dict().items(), loaded.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_allow_pickle_reads_with_weights_only(tmp_path, monkeypatch):
    folder = pickled_folder(tmp_path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_pretrained(folder, allow_pickle=True)
    assert calls == [True]


class _Payload:
    """A pickle that runs code when loaded: `exec` writes a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_a_pickle_that_runs_code_is_refused_even_when_allowed(tmp_path):
    folder = saved_folder(tmp_path)
    marker = tmp_path / "code-ran.txt"
    torch.save({"text.norm.weight": _Payload(marker)}, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: torch\.load\(weights_only"):
        load_pretrained(folder, allow_pickle=True)
    assert not marker.exists()


def test_a_pickle_of_something_else_than_tensors_is_refused(tmp_path):
    folder = saved_folder(tmp_path)
    torch.save([1, 2, 3], folder / "model.pt")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.pt: expected a mapping of weight names"):
        load_pretrained(folder, allow_pickle=True)


def test_the_cli_refuses_pickle_weights_unless_allowed(tmp_path, capsys):
    from PIL import Image

    from vtfuse.cli.main import main

    folder = pickled_folder(tmp_path)
    image = tmp_path / "scene.png"
    Image.new("RGB", (24, 24), (200, 30, 30)).save(image)
    assert main(["caption", str(folder), str(image), "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "pytorch_model.bin" in error and "--allow-pickle" in error
    command = ["caption", str(folder), str(image), "--device", "cpu", "--allow-pickle"]
    assert main(command) == 0
    assert capsys.readouterr().out.startswith(str(image))


def test_warm_start_from_pickle_weights_needs_allow_pickle(tmp_path):
    folder = pickled_folder(tmp_path)
    model = create_model(tiny_config("caption"))
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        warm_start(model, tokenizer(), folder)
    assert warm_start(model, tokenizer(), folder, allow_pickle=True).tensors > 0


def test_a_run_folder_holding_only_a_pickle_names_it(tmp_path):
    from vtfuse.training.checkpoint import resolve_model_folder

    folder = tmp_path / "downloaded"
    folder.mkdir()
    torch.save({"w": torch.zeros(2)}, folder / "model.ckpt")
    with pytest.raises(CheckpointError, match=r"model\.ckpt is a pickle file"):
        resolve_model_folder(folder)


def test_folder_with_only_a_pickle_is_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.manual_seed(0)
    torch.save(create_model(tiny_config("caption")), folder / "model.pt")
    with pytest.raises(CheckpointError, match=r"not a vtfuse model folder: no config\.json"):
        load_pretrained(folder)


def edit_config(folder: Path, edit) -> Path:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return path


def test_weights_of_another_shape_name_the_weight_and_both_shapes(tmp_path):
    folder = saved_folder(tmp_path)
    edit_config(folder, lambda c: c["model"]["text"].update(mlp_ratio=2.0))  # saved: 4.0
    with pytest.raises(CheckpointError) as info:
        load_pretrained(folder)
    message = str(info.value)
    assert str(folder / "model.safetensors") in message and "does not match its config" in message
    # vtfuse.linear.Linear stores (in, out)
    assert "text.blocks.0.mlp.net.0.weight: (32, 128) in the file, (32, 64) from the config" in (
        message
    )


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda c: c["model"]["text"].update(dim="32"),
            r"model\.text\.dim: expected int, got '32'",
        ),
        (lambda c: c["model"]["vision"].update(channels=[8, "x", 16]), r"model\.vision\.channels"),
        (lambda c: c["model"]["lm"].update(freeze=1), r"model\.lm\.freeze: expected bool"),
        (lambda c: c["model"].update(vision=[]), r"model\.vision: expected an object"),
        (lambda c: c.update(tokenizer="bpe"), r"unknown field\(s\) tokenizer"),
        (lambda c: c.pop("model"), r"field 'model' must be an object"),
    ],
)
def test_config_fields_of_the_wrong_type_or_unknown_are_named(tmp_path, edit, expected):
    folder = saved_folder(tmp_path)
    path = edit_config(folder, edit)
    with pytest.raises(ConfigError, match=expected) as info:
        load_pretrained(folder)
    assert str(path) in str(info.value)


def test_a_newer_versions_config_says_which_version_wrote_it(tmp_path):
    folder = saved_folder(tmp_path)

    def newer(config):
        config["vtfuse_version"] = "9.0.0"
        config["model"]["text"]["rotary"] = True

    edit_config(folder, newer)
    with pytest.raises(ConfigError, match=r"model\.text: unknown field\(s\) rotary.*9\.0\.0"):
        load_pretrained(folder)


def test_a_config_the_models_cannot_build_names_the_file(tmp_path):
    folder = saved_folder(tmp_path)
    path = edit_config(folder, lambda c: c["model"].update(task="segment"))
    with pytest.raises(CheckpointError, match=rf"{path}: unknown task 'segment'"):
        load_pretrained(folder)


def test_a_vocabulary_larger_than_the_embedding_is_refused(tmp_path):
    folder = saved_folder(tmp_path)
    Tokenizer.build([" ".join(f"w{i}" for i in range(30))]).save(folder)
    with pytest.raises(CheckpointError, match=r"tokenizer\.json has 34 words.*vocab_size is 11"):
        load_pretrained(folder)


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    folder = saved_folder(tmp_path)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["model"]["text"]["depth"] = 3  # the saved weights have 2 blocks
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_pretrained(folder)


# -- regressions for bugs found while writing these tests ---------------------------------
def test_config_json_that_is_not_an_object_is_refused(tmp_path):
    folder = saved_folder(tmp_path)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_pretrained(folder)


def test_a_second_crash_never_loses_every_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "last"
    write_tree(tmp_path / ".last.old", {"a": "previous"})  # an earlier crash between the renames
    assert recover(target) == tmp_path / ".last.old"

    class Crash(Exception):
        pass

    real_rename = Path.rename

    def crashing_rename(self, destination):
        if self.name == ".last.tmp":
            raise Crash
        return real_rename(self, destination)

    monkeypatch.setattr(Path, "rename", crashing_rename)
    with pytest.raises(Crash), atomic_folder(target) as folder:
        (folder / "a").write_text("new")
    found = recover(target)
    assert found is not None
    assert read_tree(found) in ({"a": "previous"}, {"a": "new"})


def test_warm_start_copies_matching_weights_and_shared_words(tmp_path):
    """A VQA model started from a captioner gets its vision encoder, fusion blocks and the
    embeddings of shared words; its own words and answer head keep their initialisation."""
    caption_words = Tokenizer.build(["a red square at the top.", "a blue circle."])
    captioner = create_model(
        ModelConfig(
            task="caption",
            vision=VISION,
            text=TextConfig(vocab_size=len(caption_words), dim=32, depth=2, heads=2, max_length=16),
        )
    )
    captioner.save_pretrained(tmp_path / "captioner", caption_words)
    question_words = Tokenizer.build(["what shape is the red object?"], answers=["square"])
    torch.manual_seed(1)
    vqa = create_model(
        ModelConfig(
            task="vqa",
            vision=VISION,
            text=TextConfig(
                vocab_size=len(question_words), dim=32, depth=2, heads=2, max_length=16
            ),
            num_answers=1,
        )
    )
    head_before = vqa.head[0].weight.clone()
    own_word = question_words.word_ids["shape"]
    own_row_before = vqa.text.token_embedding.weight[own_word].clone()

    copied = warm_start(vqa, question_words, tmp_path / "captioner")

    source = captioner.state_dict()
    for name, weight in vqa.state_dict().items():
        if name.startswith(("vision.", "text.blocks.", "text.context.")):
            assert torch.equal(weight, source[name]), name
    for word in ("red", "the", "<pad>"):
        assert torch.equal(
            vqa.text.token_embedding.weight[question_words.word_ids[word]],
            captioner.text.token_embedding.weight[caption_words.word_ids[word]],
        )
    assert torch.equal(vqa.text.token_embedding.weight[own_word], own_row_before)
    assert torch.equal(vqa.head[0].weight, head_before)
    shared = set(question_words.words) & set(caption_words.words)
    assert copied.words == len(shared)
    embedding = "text.token_embedding.weight"
    expected = [n for n in source if n.startswith(("vision.", "text.")) and n != embedding]
    assert copied.tensors == len(expected)
    assert copied.left == []  # every captioner weight found a home (lm_head is the embedding)


def test_warm_start_from_an_unrelated_model_is_refused(tmp_path):
    other = VisionConfig(image_size=24, channels=(4, 4, 4), dim=16, depth=0, heads=2)
    source = create_model(
        ModelConfig(
            task="caption",
            vision=other,
            text=TextConfig(vocab_size=20, dim=16, depth=1, heads=2, max_length=8),
        )
    )
    source.save_pretrained(tmp_path / "other", tokenizer())
    model = create_model(tiny_config("vqa"))
    # the norms of a 16-wide model share names but not shapes with a 32-wide one
    with pytest.raises(CheckpointError, match="no weight matches"):
        warm_start(model, tokenizer(), tmp_path / "other")


def test_fresh_captioner_predicts_near_uniformly():
    """Token embeddings N(0, 1/dim) tied to the output layer: unit-scale logits, so the initial
    loss is near ln(vocabulary) (unit-variance logits add ~0.5 nat, and the residual stream
    still favours repeating the input word); N(0, 1) embeddings, tied, would start at
    ~15 nats (see TaskModel.init_weights)."""
    torch.manual_seed(0)
    config = tiny_config("caption")
    model = create_model(config)
    loss = model.training_loss(batch("caption"))
    assert np.log(config.text.vocab_size) - 0.5 < loss.item() < np.log(config.text.vocab_size) + 1.5
    first_block_input = model.text.token_embedding(torch.arange(20)) * model.text.embedding_scale
    assert 0.8 < first_block_input.std().item() < 1.2


def test_format_4_retrieval_checkpoint_is_upgraded_on_load(tmp_path):
    """Format 4's retrieval model embedded an image as the projected mean of its tokens; a
    format-4 folder loads with a zero attention pool and embeds images as it did."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = create_model(tiny_config("retrieval")).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder, tokenizer())
    weights = load_file(folder / "model.safetensors")
    old = {name: t for name, t in weights.items() if not name.startswith("image_pool.")}
    assert len(old) < len(weights)
    save_file(old, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "format_version": 4}))

    upgraded, _ = load_pretrained(folder)
    images = torch.randint(0, 256, (3, 3, 24, 24), dtype=torch.uint8)
    with torch.no_grad():
        embeddings, _ = upgraded.embed_images(images)
        mean = F.normalize(model.image_projection(model.encode_image(images).mean(dim=1)), dim=-1)
        pooled, _ = model.embed_images(images)
    torch.testing.assert_close(embeddings, mean)
    assert not torch.allclose(pooled, mean, atol=1e-3)  # the new model's pool does more
