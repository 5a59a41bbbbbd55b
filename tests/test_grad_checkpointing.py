"""Activation checkpointing (`--grad-checkpointing`): the same gradients with and without it,
every layer actually recomputed while training, and nothing changed at inference."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import vtfuse.grad_checkpointing as grad_checkpointing
from vtfuse.config import (
    FusionConfig,
    ModelConfig,
    RunConfig,
    TextConfig,
    TrainConfig,
    VisionConfig,
    load_run_config,
)
from vtfuse.generation import greedy
from vtfuse.grad_checkpointing import set_grad_checkpointing
from vtfuse.models import create_model

VISION = VisionConfig(image_size=24, channels=(8, 8, 16), dim=32, depth=2, heads=2, dropout=0.1)
TEXT = TextConfig(vocab_size=20, dim=32, depth=3, heads=2, max_length=16, dropout=0.1)


def config(task: str = "caption", fusion: str = "cross_attention") -> ModelConfig:
    return ModelConfig(
        task=task,
        vision=VISION,
        text=TEXT,
        fusion=FusionConfig(fusion),
        num_answers=5 if task == "vqa" else 0,
    )


def batch(task: str = "caption") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 20, (3, 7), generator=g)
    tokens[:, 0] = 1
    tokens[2, 5:] = 0
    out = {
        "images": torch.randint(0, 256, (2, 3, 24, 24), generator=g, dtype=torch.uint8),
        "image_index": torch.tensor([0, 1, 1]),
        "tokens": tokens,
        "token_mask": tokens != 0,
    }
    if task == "vqa":
        out["answers"] = torch.tensor([0, 4, 2])
    return out


@pytest.fixture
def checkpoint_calls(monkeypatch) -> list[str]:
    """The layers `torch.utils.checkpoint` ran, by class name."""
    calls: list[str] = []
    real = grad_checkpointing.checkpoint

    def counting(layer, *args, **kwargs):
        calls.append(type(layer).__name__)
        return real(layer, *args, **kwargs)

    monkeypatch.setattr(grad_checkpointing, "checkpoint", counting)
    return calls


def gradients(model, data, task: str = "caption") -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks in both runs
    model.training_loss(data).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(plain: dict, checkpointed: dict) -> None:
    assert plain.keys() == checkpointed.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize(
    ("task", "fusion"),
    [
        ("caption", "cross_attention"),
        ("caption", "co_attention"),  # the image stream changes block by block
        ("caption", "concat"),  # single stream: image tokens in the sequence
        ("vqa", "cross_attention"),  # an encoder
    ],
)
def test_gradients_are_the_same_with_checkpointing(task, fusion, checkpoint_calls):
    torch.manual_seed(0)
    model = create_model(config(task, fusion)).train()
    data = batch(task)
    plain = gradients(model, data)
    assert checkpoint_calls == []
    switched = set_grad_checkpointing(model)
    assert switched == ["vision", "text"]
    checkpointed = gradients(model, data)
    assert checkpoint_calls == ["SelfAttentionBlock"] * 2 + ["FusionBlock"] * 3
    assert_same_gradients(plain, checkpointed)
    set_grad_checkpointing(model, False)
    checkpoint_calls.clear()
    assert_same_gradients(plain, gradients(model, data))
    assert checkpoint_calls == []


def test_inference_and_cached_generation_are_untouched(checkpoint_calls):
    torch.manual_seed(0)
    model = create_model(config()).eval()
    images = batch()["images"]
    with torch.no_grad():
        expected = greedy(model, images, 10, 1, 2, need_weights=True)
    set_grad_checkpointing(model)
    with torch.no_grad():
        actual = greedy(model, images, 10, 1, 2, need_weights=True)
    assert actual.tokens == expected.tokens
    for a, b in zip(actual.attention, expected.attention, strict=True):
        assert torch.equal(a, b)
    model.train()  # training mode, gradients on, but with caches: still not recomputed
    data = batch()
    with torch.no_grad():
        model.training_loss(data)
    cache = model.text.new_cache()
    model.text(data["tokens"][:, :3], model.encode_image(data["images"]), caches=cache,
               image_index=data["image_index"])  # fmt: skip
    assert checkpoint_calls == ["SelfAttentionBlock"] * 2  # the image, encoded with gradients


@pytest.mark.parametrize("freeze", [True, False], ids=["frozen-lm", "trained-lm"])
def test_a_pretrained_lm_checkpoints_its_own_layers(gpt2_folder, freeze, monkeypatch):
    import transformers.modeling_utils

    calls = []
    real = transformers.modeling_utils.checkpoint

    def counting(function, *args, **kwargs):
        calls.append(function)
        return real(function, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting)
    lm = dataclasses.replace(ModelConfig().lm, name=str(gpt2_folder), freeze=freeze)
    model_config = dataclasses.replace(
        config(), lm=lm, fusion=FusionConfig("gated_cross_attention")
    )
    torch.manual_seed(0)
    model = create_model(model_config).train()
    for block in model.inserted:  # open the gates, so the image matters
        block.fusion.attn_gate.data.fill_(0.5)
        block.fusion.ff_gate.data.fill_(0.5)
    data = batch()
    data["tokens"] = data["tokens"].clamp(max=40)
    plain = gradients(model, data)
    switched = set_grad_checkpointing(model)
    assert "lm" in switched and not any(name.startswith("lm.") for name in switched)
    model.train()  # as the trainer does after switching: a frozen LM's layers checkpoint too
    checkpointed = gradients(model, data)
    assert len(calls) == 3  # every GPT-2 layer
    assert_same_gradients(plain, checkpointed)
    assert not model.lm.transformer.h[0].layer.attn.training or not freeze  # dropout stays off
    model.eval()
    calls.clear()
    with torch.no_grad():
        model.training_loss(data)
    assert calls == []


def test_old_config_files_load_and_the_flag_reaches_the_run_file(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"train": {"epochs": 1, "batch_size": 4}}))  # no such field
    assert load_run_config(path).train.grad_checkpointing is False
    assert RunConfig().train.grad_checkpointing is False


def test_training_with_checkpointing_takes_the_same_steps(tmp_path):
    from vtfuse.data.synth import SynthSpec, generate
    from vtfuse.training import train

    generate(tmp_path / "data", SynthSpec(images=12, size=24, seed=1), progress=False)
    model = dataclasses.replace(
        config(), text=dataclasses.replace(TEXT, vocab_size=0, max_length=48)
    )
    results = {}
    for name, on in (("plain", False), ("checkpointed", True)):
        settings = TrainConfig(epochs=1, batch_size=8, save_every=0, grad_checkpointing=on)
        lines = []
        train("caption", tmp_path / "data" / "caption_train.jsonl", tmp_path / name, None,
              model, settings, progress=False, log=lines.append)  # fmt: skip
        results[name] = create_model_weights(tmp_path / name)
        assert any("gradient checkpointing in: vision, text" in x for x in lines) == on
    run = json.loads((tmp_path / "checkpointed" / "run.json").read_text())
    assert run["train_config"]["grad_checkpointing"] is True
    for name, weight in results["plain"].items():
        torch.testing.assert_close(results["checkpointed"][name], weight, atol=1e-6, rtol=0)


def create_model_weights(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "last" / "model.safetensors")
