"""The speed benchmark compares like with like: vtfuse's captioner and transformers'
VisionEncoderDecoderModel are built at the same size, and every workload runs on both."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.tools import require_module

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
matched = require_module("matched")
run = require_module("run")
require_module("transformers")


@pytest.mark.parametrize("size", sorted(matched.SIZES))
def test_the_two_models_have_the_same_size(size):
    spec = matched.SIZES[size]
    ours = matched.parameters(matched.vtfuse_captioner(spec))
    theirs = matched.parameters(matched.hf_captioner(spec))
    assert abs(ours / theirs - 1) < 0.02, (ours, theirs)


def test_every_workload_does_the_same_work_on_both():
    """At a tiny size: both generate exactly `new_tokens` tokens per image (beams too), and
    both training steps change the weights."""
    tiny = replace(matched.SIZES["small"], name="tiny", image_size=16, hidden=32, layers=1)
    tiny = replace(tiny, heads=2, vocab=50, new_tokens=5)
    device = torch.device("cpu")
    for work in run.WORKLOADS:
        work = replace(work, batch=2)
        for name in run.MODELS:
            model = run.MODELS[name](tiny)
            job = run.JOBS[name](model, tiny, work, run.inputs(tiny, work.batch, device))
            run.prepare(name, model, work)
            before = [p.detach().clone() for p in model.parameters()]
            out = job()
            if work.train:
                after = list(model.parameters())
                moved = sum(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
                assert moved > len(before) // 2, name
            elif name == "vtfuse":
                assert [len(t) for t in out.tokens] == [tiny.new_tokens] * work.batch
            else:
                assert out.shape == (work.batch, tiny.new_tokens + 1)  # with the start token
