"""`--precision auto`: bf16 autocast where it times faster, fp32 elsewhere, the model untouched."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import random_images, shaken_captioner
from vtfuse.training import precision
from vtfuse.training.precision import choose_precision, step_speedup

CPU = torch.device("cpu")


def never_called() -> dict[str, torch.Tensor]:
    raise AssertionError("nothing should have been timed")


def batch_for(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    tokens = torch.randint(3, model.config.text.vocab_size, (3, 7))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    return {"images": random_images(3), "image_index": torch.arange(3), "tokens": tokens,
            "token_mask": mask}  # fmt: skip


@pytest.mark.parametrize("asked", ["fp32", "bf16"])
def test_an_explicit_precision_is_kept_untimed(asked):
    assert choose_precision(asked, shaken_captioner(), never_called, CPU) == (asked, None)


def test_an_unknown_precision_names_the_choices():
    with pytest.raises(ValueError, match=r"'fp16'.*auto, fp32, bf16"):
        choose_precision("fp16", shaken_captioner(), never_called, CPU)


def test_auto_is_fp32_untimed_without_bf16_units_or_under_the_parameter_floor(monkeypatch):
    model = shaken_captioner()
    monkeypatch.setattr(precision, "bf16_is_fast", lambda device: False)
    monkeypatch.setattr(precision, "MIN_PARAMETERS", 0)
    assert choose_precision("auto", model, never_called, CPU) == ("fp32", None)
    monkeypatch.setattr(precision, "bf16_is_fast", lambda device: True)
    monkeypatch.setattr(precision, "MIN_PARAMETERS", model.num_parameters() + 1)
    assert choose_precision("auto", model, never_called, CPU) == ("fp32", None)


@pytest.mark.parametrize(("speedup", "used"), [(1.27, "bf16"), (1.05, "fp32"), (0.73, "fp32")])
def test_auto_keeps_bf16_only_when_its_step_is_clearly_faster(monkeypatch, speedup, used):
    """At least MIN_SPEEDUP (1.1×): measured 1.27× for the default captioner, 0.73× for the
    default VQA model; a sharded (FSDP) model is not timed and takes bf16."""
    model = shaken_captioner()
    monkeypatch.setattr(precision, "bf16_is_fast", lambda device: True)
    monkeypatch.setattr(precision, "MIN_PARAMETERS", 0)
    monkeypatch.setattr(precision, "step_speedup", lambda *args: speedup)
    assert choose_precision("auto", model, lambda: {}, CPU) == (used, speedup)
    assert choose_precision("auto", model, never_called, CPU, sharded=True) == ("bf16", None)


def test_timing_the_step_leaves_the_model_and_the_random_stream_as_they_were():
    """A real fwd + bwd in each precision: a positive ratio, no gradient left, no weight moved,
    the next random number the one it would have been (dropout draws from it)."""
    model = shaken_captioner().train()
    batch = batch_for(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = torch.get_rng_state()
    speedup = step_speedup(model, batch, CPU, steps=1)
    assert speedup > 0
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert torch.equal(torch.get_rng_state(), state)
