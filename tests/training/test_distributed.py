"""Data parallelism and its equivalences, on CPU with gloo: 2 processes × batch B step as one
process × batch 2B; K accumulated batches of B step as one batch of K·B; a non-finite step is
skipped, and too many stop the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vtfuse.cli.main import main
from vtfuse.config import ModelConfig, TextConfig, TrainConfig, VisionConfig
from vtfuse.data.bank import load_records
from vtfuse.data.items import collate
from vtfuse.data.synth import SynthSpec, generate
from vtfuse.models.factory import load_pretrained
from vtfuse.models.vqa import VQAModel
from vtfuse.tasks import read_jsonl, task_dataset
from vtfuse.training import train
from vtfuse.training.trainer import TrainingDiverged

# No dropout: the runs these tests compare must compute the same function, and two processes
# draw other masks than one process does for the same examples.
TINY = {
    "model": {
        "vision": {"image_size": 24, "channels": [8, 8, 16], "dim": 32, "depth": 0, "heads": 2},
        "text": {"dim": 32, "depth": 1, "heads": 2, "dropout": 0.0},
    }
}
MODEL = ModelConfig(
    vision=VisionConfig(image_size=24, channels=(8, 8, 16), dim=32, depth=0, heads=2),
    text=TextConfig(dim=32, depth=1, heads=2, dropout=0.0),
)


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    """64 VQA lines: whole batches of 16 for one process, of 8 for each of two."""
    root = tmp_path_factory.mktemp("ddp")
    generate(root, SynthSpec(images=24, size=24, seed=5), progress=False)
    lines = (root / "vqa_train.jsonl").read_text().splitlines()[:64]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "tiny.json").write_text(json.dumps(TINY))
    return root


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "last" / "model.safetensors")


def assert_same_model(a: Path, b: Path, data: Path) -> None:
    """The same weights (each matrix within 0.1 % of its norm) and the same answers. Not
    bit-equal: the two runs sum in different orders, and where a gradient is zero in exact
    arithmetic (key biases, conv biases before a GroupNorm, some key weights) Adam turns the
    rounding noise into steps of size lr — without changing what the model computes."""
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    for name in first:
        if first[name].dim() >= 2:
            error = (first[name] - second[name]).norm() / first[name].norm()
            assert error < 1e-3, (name, error.item())
    models = [load_pretrained(run / "last")[0] for run in (a, b)]
    records = load_records(read_jsonl(data, "vqa")[:16], 24, progress=False)
    batch = collate(
        [task_dataset("vqa", records, load_pretrained(a / "last")[1], 48)[i] for i in range(16)]
    )
    with torch.no_grad():
        answers = [
            m(batch["images"], batch["tokens"], batch["token_mask"], batch["image_index"])[0]
            for m in models
        ]
    torch.testing.assert_close(answers[0], answers[1], atol=1e-4, rtol=1e-4)


def test_two_processes_step_as_one_with_twice_the_batch(questions, tmp_path):
    base = ["train", "--task", "vqa", "--train", str(questions / "train.jsonl")]
    base += ["--config", str(questions / "tiny.json"), "--epochs", "2", "--lr", "0.003"]
    base += ["--no-progress"]
    assert main([*base, "--out", str(tmp_path / "one"), "--batch-size", "16"]) == 0
    two = [*base, "--out", str(tmp_path / "two"), "--batch-size", "8", "--nproc", "2"]
    assert main(two) == 0
    assert_same_model(tmp_path / "one", tmp_path / "two", questions / "train.jsonl")
    log = (tmp_path / "two" / "log.jsonl").read_text().splitlines()
    assert json.loads(log[-1])["step"] == 8  # 64 examples / (8 × 2) per epoch, 2 epochs


def train_big_and_accumulated(
    task: str, data: Path, out: Path, big: int, micro: int, accumulate: int
) -> tuple[Path, Path]:
    """One run with batches of `big`, one with `accumulate` micro-batches of `micro` a step."""
    runs = {"big": (big, 1), "accumulated": (micro, accumulate)}
    for name, (batch, steps) in runs.items():
        config = TrainConfig(epochs=2, lr=3e-3, save_every=0, batch_size=batch, grad_accum=steps)
        train(task, data, out / name, None, MODEL, config, progress=False, log=lambda _: None)
    return out / "big", out / "accumulated"


def test_accumulated_batches_step_as_one_big_batch(questions, tmp_path):
    data = questions / "train.jsonl"
    big, accumulated = train_big_and_accumulated("vqa", data, tmp_path, 16, 4, 4)
    assert_same_model(big, accumulated, data)


def test_accumulated_captions_step_as_one_batch_of_all_their_tokens(captions, tmp_path):
    """Captions of unequal length: 3 micro-batches of 4 (then 4 + 2 at the end of an epoch of
    30) step as batches of 12 (then 6), each token weighing the same, not each micro-batch's
    own token mean."""
    assert_close_weights(*train_big_and_accumulated("caption", captions, tmp_path, 12, 4, 3))


def test_non_finite_steps_are_skipped_then_stop_the_run(questions, tmp_path, monkeypatch):
    real = VQAModel.training_loss
    calls = {"n": 0}

    def sometimes_nan(self, batch, label_smoothing=0.0):
        calls["n"] += 1
        loss = real(self, batch, label_smoothing)
        return loss * float("nan") if calls["n"] in (2, 3) else loss

    monkeypatch.setattr(VQAModel, "training_loss", sometimes_nan)
    config = TrainConfig(epochs=1, batch_size=8, save_every=0)
    result = train(
        "vqa",
        questions / "train.jsonl",
        tmp_path / "a",
        None,
        MODEL,
        config,
        progress=False,
        log=lambda _: None,
    )
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert sum("skipped" in entry for entry in log) == 2 and result.step == 8 - 2
    assert torch.isfinite(torch.stack(list(weights(tmp_path / "a").values())[:1])).all()

    monkeypatch.setattr(
        VQAModel, "training_loss", lambda self, b, s=0.0: real(self, b, s) * float("nan")
    )
    stopping = TrainConfig(epochs=1, batch_size=8, save_every=0, max_bad_steps=3)
    with pytest.raises(TrainingDiverged, match="3 steps in a row"):
        train(
            "vqa",
            questions / "train.jsonl",
            tmp_path / "b",
            None,
            MODEL,
            stopping,
            progress=False,
            log=lambda _: None,
        )


# -- FSDP --------------------------------------------------------------------------------------
def assert_close_weights(a: Path, b: Path) -> None:
    """Matrices within 0.1 % of their norm, and the scalars (gates, temperatures: kept whole
    under FSDP, their gradients averaged by hand) within 1e-3. Vectors are left out: some get
    a zero gradient in exact arithmetic (see assert_same_model)."""
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys() and first
    for name in first:
        if first[name].dim() >= 2:
            error = (first[name] - second[name]).norm() / first[name].norm()
            assert error < 1e-3, (name, error.item())
        elif first[name].dim() == 0:
            torch.testing.assert_close(second[name], first[name], atol=1e-3, rtol=0, msg=name)


def zero_gradient_in_exact_arithmetic(name: str) -> bool:
    """Key biases (softmax ignores a shift of every logit) and conv biases before a
    GroupNorm: Adam turns their rounding-noise gradients into steps of size lr (see
    assert_same_model), so they match nothing but a bit-identical run."""
    return name.endswith("to_kv.bias") or (name.startswith("vision.stem.") and "bias" in name)


KILLED_RANK = """
import os, signal, sys, torch
from vtfuse.cli.main import main
real, steps = torch.optim.AdamW.step, {{"n": 0}}

def step(self, *args, **kwargs):
    steps["n"] += 1
    if steps["n"] == {kill_at} and os.environ["RANK"] == "0":
        os.kill(os.getpid(), signal.SIGKILL)  # rank 0 dies mid-run: no handler, no goodbye
    return real(self, *args, **kwargs)

torch.optim.AdamW.step = step
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_a_two_process_run_killed_with_sigkill_resumes_to_identical_weights(
    questions, tmp_path, sharding
):
    """DDP or FSDP over 2 processes; rank 0 is SIGKILLed at step 7 (the last checkpoint: step
    6); torchrun takes the other down; `--resume --nproc 2` ends bit for bit where a run never
    interrupted ends."""
    import subprocess
    import sys

    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY, "train": {"save_every": 2}}))
    args = ["train", "--task", "vqa", "--train", str(questions / "train.jsonl"), *sharding]
    args += ["--config", str(config), "--epochs", "3", "--batch-size", "8", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "straight"), "--nproc", "2"]) == 0
    killer = tmp_path / "killer.py"
    killer.write_text(KILLED_RANK.format(kill_at=7))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command = [*launcher, "--nproc-per-node=2", str(killer), *args]
    killed = subprocess.run(
        [*command, "--out", str(tmp_path / "killed")], capture_output=True, check=False
    )
    assert killed.returncode != 0, killed.stderr.decode()[-2000:]
    state = json.loads((tmp_path / "killed" / "last" / "training_state.json").read_text())
    assert state["progress"]["step"] == 6
    assert main([*args, "--out", str(tmp_path / "killed"), "--nproc", "2", "--resume"]) == 0
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


def test_fsdp_two_processes_step_as_one_with_twice_the_batch(questions, tmp_path, capfd):
    base = ["train", "--task", "vqa", "--train", str(questions / "train.jsonl")]
    base += ["--config", str(questions / "tiny.json"), "--epochs", "2", "--lr", "0.003"]
    base += ["--no-progress"]
    assert main([*base, "--out", str(tmp_path / "one"), "--batch-size", "16"]) == 0
    sharded = [*base, "--out", str(tmp_path / "two"), "--batch-size", "8", "--nproc", "2"]
    assert main([*sharded, "--fsdp"]) == 0
    assert_same_model(tmp_path / "one", tmp_path / "two", questions / "train.jsonl")
    assert_close_weights(tmp_path / "one", tmp_path / "two")
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["train_config"]["fsdp"] is True
    log = (tmp_path / "two" / "log.jsonl").read_text().splitlines()
    assert json.loads(log[-1])["step"] == 8
    # stopped after its first step, then resumed: the steps of the run never stopped
    resumed = [*base, "--out", str(tmp_path / "resumed"), "--batch-size", "8", "--nproc", "2"]
    assert main([*resumed, "--fsdp", "--max-minutes", "0.0000001"]) == 0
    assert "stopped at step 1" in capfd.readouterr().out
    assert main([*resumed, "--resume"]) == 0  # the run's own config: --fsdp
    assert "resumed from" in capfd.readouterr().out
    uninterrupted, continued = weights(tmp_path / "two"), weights(tmp_path / "resumed")
    for name, weight in uninterrupted.items():
        if not zero_gradient_in_exact_arithmetic(name):
            torch.testing.assert_close(continued[name], weight, atol=1e-6, rtol=0, msg=name)


def test_fsdp_needs_several_processes(questions, tmp_path, capsys):
    args = ["train", "--task", "vqa", "--train", str(questions / "train.jsonl"), "--fsdp"]
    args += ["--config", str(questions / "tiny.json"), "--out", str(tmp_path / "r")]
    assert main([*args, "--no-progress"]) == 2
    assert "--fsdp shards the model over several processes" in capsys.readouterr().err


def test_fsdp_with_a_frozen_pretrained_lm(questions, gpt2_folder, tmp_path):
    """GPT-2 frozen (its parameters sharded, no gradient reduced for them), the gated blocks
    trained (their scalar gates kept whole on every rank): the same weights as DDP, and both
    as one process with the global batch (the caption loss divides by the step's tokens, not
    each rank's own: the ranks hold captions of different lengths)."""
    records = read_jsonl(questions / "caption_train.jsonl", "caption")
    pairs = [{"image": r.fields["image"], "caption": c} for r in records for c in r.captions]
    assert len(pairs) >= 32  # whole batches: 2 × 2 of 8
    lines = [json.dumps(pair) for pair in pairs[:32]]
    (questions / "captions.jsonl").write_text("\n".join(lines) + "\n")  # beside the images
    base = ["train", "--task", "caption", "--train", str(questions / "captions.jsonl")]
    base += ["--lm", str(gpt2_folder), "--config", str(questions / "tiny.json")]
    base += ["--epochs", "2", "--lr", "0.01", "--no-progress", "--batch-size", "8"]
    one = [*base[:-2], "--batch-size", "16", "--out", str(tmp_path / "one")]
    assert main(one) == 0
    base += ["--nproc", "2"]
    assert main([*base, "--out", str(tmp_path / "ddp")]) == 0
    assert main([*base, "--out", str(tmp_path / "fsdp"), "--fsdp"]) == 0
    assert_close_weights(tmp_path / "one", tmp_path / "ddp")
    replicated, sharded = weights(tmp_path / "ddp"), weights(tmp_path / "fsdp")
    assert replicated.keys() == sharded.keys()
    assert not any(name.startswith("lm.transformer.h.0.layer.") for name in sharded)  # frozen
    for name, weight in replicated.items():
        if not zero_gradient_in_exact_arithmetic(name):
            torch.testing.assert_close(sharded[name], weight, atol=1e-5, rtol=1e-5, msg=name)
    gates = [n for n in sharded if n.endswith("attn_gate")]
    assert gates and all(sharded[n].abs() > 0 for n in gates)  # trained, from 0


@pytest.fixture(scope="module")
def captions(questions) -> Path:
    """15 images with two captions each: in every global batch of 10 (5 images, each image's
    captions together), the third image's captions fall one into each rank's half."""
    lines = (questions / "caption_train.jsonl").read_text().splitlines()[:15]
    (questions / "split_captions.jsonl").write_text("\n".join(lines) + "\n")
    return questions / "split_captions.jsonl"


LOSSES_OF_THE_GLOBAL_BATCH = {
    # every rank's texts against every rank's images, an image split over two ranks once
    "contrastive": ["--task", "joint", "--losses", "itc"],
    # the mean over all ranks' caption tokens, whichever rank holds the longer captions
    "captioning": ["--task", "caption"],
}


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
@pytest.mark.parametrize("loss", LOSSES_OF_THE_GLOBAL_BATCH)
def test_losses_of_the_whole_global_batch_step_as_one_process(
    captions, questions, tmp_path, loss, engine
):
    """2 × batch 5 steps as 1 × batch 10 for the losses that are not a mean over examples of
    equal count per rank (see vtfuse.models.across_ranks). Contrasting within each rank's own
    batch, or averaging each rank's own tokens, would not."""
    base = ["train", *LOSSES_OF_THE_GLOBAL_BATCH[loss], "--train", str(captions), "--epochs", "2"]
    base += ["--config", str(questions / "tiny.json"), "--lr", "0.003", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "one"), "--batch-size", "10"]) == 0
    two = [*base, "--out", str(tmp_path / "two"), "--batch-size", "5", "--nproc", "2"]
    assert main(two + (["--fsdp"] if engine == "fsdp" else [])) == 0
    assert_close_weights(tmp_path / "one", tmp_path / "two")
    log = (tmp_path / "two" / "log.jsonl").read_text().splitlines()
    assert json.loads(log[-1])["step"] == 6  # 30 examples / (5 × 2) per epoch, 2 epochs


def test_an_image_split_over_ranks_is_one_image_of_the_global_batch():
    """The loss's bookkeeping on one process: gathering is the identity, and the image ids
    fold repeated images into one column, as the collated batch of all ranks would have."""
    from vtfuse.models.contrastive import contrastive_loss

    torch.manual_seed(0)
    texts = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    images = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    owner, scale = torch.tensor([0, 0, 1, 1]), torch.tensor(5.0)
    once = contrastive_loss(texts, images, owner, scale, image_ids=torch.tensor([7, 9]))
    # image 7 again as a third row (another rank's copy): the same loss
    repeated = torch.cat([images, images[:1]])
    twice = contrastive_loss(
        texts, repeated, torch.tensor([0, 2, 1, 1]), scale, image_ids=torch.tensor([7, 9, 7])
    )
    torch.testing.assert_close(twice, once)
    logits = scale * texts @ images.T
    by_hand = (
        torch.nn.functional.cross_entropy(logits, owner)
        - (torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]) * logits.T.log_softmax(-1))
        .sum(1)
        .mean()
    ) / 2
    torch.testing.assert_close(once, by_hand)


def test_the_global_batch_sampler_cuts_every_global_batch_into_the_ranks_slices():
    from torch.utils.data.distributed import DistributedSampler

    from vtfuse.training.distributed import Distributed, GlobalBatchSampler

    image_ids = [i // 2 for i in range(22)]  # 11 images, two examples each
    one = GlobalBatchSampler(image_ids, 6, Distributed(), seed=4)
    ranks = [GlobalBatchSampler(image_ids, 3, Distributed(r, 2), seed=4) for r in (0, 1)]
    assert isinstance(one, DistributedSampler)
    for epoch in (0, 1):
        for sampler in (one, *ranks):
            sampler.set_epoch(epoch)
        whole = list(one)
        assert sorted(whole) == list(range(22))  # one process: every example
        parts = [list(rank) for rank in ranks]
        assert [len(p) for p in parts] == [len(r) for r in ranks] == [9, 9]  # 22 // 6 batches
        joined = [i for b in range(3) for p in parts for i in p[3 * b : 3 * b + 3]]
        assert joined == whole[:18]  # global batch b = rank 0's b-th slice, then rank 1's
    epoch_1 = list(one)
    one.set_epoch(0)
    assert list(one) != epoch_1  # reseeded per epoch
    resumed = GlobalBatchSampler(image_ids, 3, Distributed(1, 2), seed=4, skip=2)
    resumed.set_epoch(1)
    assert list(resumed) == parts[1][6:] and len(resumed) == 3
