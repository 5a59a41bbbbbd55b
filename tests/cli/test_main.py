"""Every `vtfuse` subcommand, end to end on a tiny synthetic dataset, as a user runs them."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from vtfuse.cli.main import COMMANDS, main

TINY_MODEL = {
    "model": {
        "vision": {
            "image_size": 24,
            "patch_size": 8,
            "channels": [8, 8, 16],
            "dim": 32,
            "depth": 1,
            "heads": 2,
        },
        "text": {"dim": 32, "depth": 2, "heads": 2, "max_length": 48},
    },
    "train": {"epochs": 2, "batch_size": 16, "lr": 0.003},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    assert (
        main(
            ["synth", "--out", str(root / "data"), "--images", "30", "--size", "24", "--seed", "2"]
        )
        == 0
    )
    (root / "tiny.json").write_text(json.dumps(TINY_MODEL))
    for task in ("caption", "vqa"):
        code = main(
            [
                "train",
                "--task",
                task,
                "--train",
                str(root / "data" / f"{task}_train.jsonl"),
                "--val",
                str(root / "data" / f"{task}_val.jsonl"),
                "--out",
                str(root / task),
                "--config",
                str(root / "tiny.json"),
                "--no-progress",
            ]
        )
        assert code == 0
    return root


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert "usage: vtfuse " + name in capsys.readouterr().out


def test_synth_writes_all_splits(workspace):
    for task in ("caption", "vqa", "retrieval"):
        for split in ("train", "val", "test"):
            assert (workspace / "data" / f"{task}_{split}.jsonl").stat().st_size > 0


def test_train_flags_override_the_config_file(workspace):
    run = json.loads((workspace / "caption" / "run.json").read_text())
    assert run["model"]["vision"]["dim"] == 32 and run["train_config"]["epochs"] == 2
    assert run["model"]["text"]["vocab_size"] > 4


def test_eval_writes_metrics_and_predictions(workspace, capsys):
    for task, keys in (
        (
            "caption",
            {"bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "object_f1"},
        ),
        ("vqa", {"accuracy", "accuracy_by_type", "pointing_accuracy"}),
    ):
        data = workspace / "data" / f"{task}_test.jsonl"
        metrics_path, predictions_path = workspace / f"{task}_m.json", workspace / f"{task}_p.jsonl"
        assert (
            main(
                [
                    "eval",
                    str(workspace / task),
                    "--data",
                    str(data),
                    "--metrics",
                    str(metrics_path),
                    "--predictions",
                    str(predictions_path),
                    "--no-progress",
                ]
            )
            == 0
        )
        metrics = json.loads(metrics_path.read_text())
        assert keys <= set(metrics)
        inputs = data.read_text().splitlines()
        outputs = predictions_path.read_text().splitlines()
        assert len(inputs) == len(outputs)
        for line_in, line_out in zip(inputs, outputs, strict=True):
            original, predicted = json.loads(line_in), json.loads(line_out)
            assert {k: predicted[k] for k in original} == original  # input order, fields kept
            assert isinstance(predicted["prediction"], str)
        assert "accuracy" in capsys.readouterr().out or task == "caption"


def test_caption_ask_and_attention(workspace, capsys):
    image = str(workspace / "data" / "images" / "000000.png")
    assert main(["caption", str(workspace / "caption"), image, image, "--beam-size", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(image + "\t")
    assert (
        main(
            ["ask", str(workspace / "vqa"), image, "what shape is the red object?", "--top-k", "3"]
        )
        == 0
    )
    answers = capsys.readouterr().out.strip().splitlines()
    assert len(answers) == 3 and all("%" in a for a in answers)
    for task, extra in (("caption", []), ("vqa", ["--question", "is the red object on the left?"])):
        out = workspace / f"{task}_attention.png"
        assert (
            main(
                [
                    "attention",
                    str(workspace / task),
                    image,
                    "--out",
                    str(out),
                    "--layer",
                    "0",
                    *extra,
                ]
            )
            == 0
        )
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_malformed_line_names_file_and_line(workspace, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = (workspace / "data" / "caption_train.jsonl").read_text().splitlines()
    bad.write_text("\n".join([good[0], '{"image": "x.png", "caption": ', good[1]]) + "\n")
    shutil.copytree(workspace / "data" / "images", tmp_path / "images")
    code = main(
        [
            "train",
            "--task",
            "caption",
            "--train",
            str(bad),
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ]
    )
    assert code == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err


def test_corrupt_image_is_named_or_skipped_and_counted(workspace, tmp_path, capsys):
    shutil.copytree(workspace / "data" / "images", tmp_path / "images")
    (tmp_path / "images" / "000001.png").write_bytes(b"not a png at all")
    lines = (workspace / "data" / "caption_train.jsonl").read_text()
    (tmp_path / "train.jsonl").write_text(lines)
    bad_line = next(i for i, line in enumerate(lines.splitlines(), 1) if "000001.png" in line)
    args = [
        "train",
        "--task",
        "caption",
        "--train",
        str(tmp_path / "train.jsonl"),
        "--out",
        str(tmp_path / "run"),
        "--config",
        str(workspace / "tiny.json"),
        "--epochs",
        "1",
        "--no-progress",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"train.jsonl:{bad_line}" in err and "000001.png" in err
    assert main([*args, "--skip-bad"]) == 0
    assert "skipped 1 training example" in capsys.readouterr().out


def test_image_paths_outside_the_data_folder_need_an_image_root(workspace, tmp_path, capsys):
    """A JSONL file kept apart from its images (as `vtfuse data import` writes them without
    --copy-images): refused line by line until the images' folder is allowed."""
    lists = tmp_path / "lists"
    lists.mkdir()
    images = workspace / "data" / "images"
    for split in ("train", "val"):
        lines = (workspace / "data" / f"caption_{split}.jsonl").read_text()
        relative = Path(os.path.relpath(images, lists))
        moved = lines.replace('"images/', f'"{relative.as_posix()}/')
        (lists / f"{split}.jsonl").write_text(moved)
    args = ["train", "--task", "caption", "--train", str(lists / "train.jsonl")]
    args += ["--out", str(tmp_path / "run"), "--config", str(workspace / "tiny.json")]
    args += ["--epochs", "1", "--no-progress"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert f"train.jsonl:1: image path '{relative.as_posix()}/" in error
    assert "leaves the data folder through '..'" in error and "--image-root" in error
    assert main([*args, "--image-root", str(images)]) == 0
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["train_config"]["image_roots"] == [str(images.resolve())]  # for --resume
    evaluation = ["eval", str(tmp_path / "run"), "--data", str(lists / "val.jsonl")]
    assert main([*evaluation, "--no-progress"]) == 2
    assert "val.jsonl:1: image path" in capsys.readouterr().err
    assert main([*evaluation, "--no-progress", "--skip-bad"]) == 2  # every line skipped
    assert "no example has a readable image" in capsys.readouterr().err
    assert main([*evaluation, "--no-progress", "--image-root", str(images)]) == 0


def test_unknown_option_and_bad_config_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--task", "caption", "--bogus"])
    assert exit_info.value.code == 2
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": {"vision": {"widht": 3}}}))
    assert (
        main(
            [
                "train",
                "--task",
                "caption",
                "--train",
                "x.jsonl",
                "--out",
                str(tmp_path / "r"),
                "--config",
                str(config),
            ]
        )
        == 2
    )
    assert "widht" in capsys.readouterr().err


def tiny_vqa_training(workspace: Path, out: Path) -> list[str]:
    """`vtfuse train` arguments for a tiny VQA run on the workspace's data."""
    return [
        "train",
        "--task",
        "vqa",
        "--train",
        str(workspace / "data" / "vqa_train.jsonl"),
        "--out",
        str(out),
        "--config",
        str(workspace / "tiny.json"),
        "--no-progress",
    ]


def test_resume_continues_through_the_cli(workspace, tmp_path, capsys):
    args = tiny_vqa_training(workspace, tmp_path / "r")
    assert main([*args, "--max-minutes", "0.0000001"]) == 0
    assert "stopped at step 1" in capsys.readouterr().out
    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "finished at step" in out


def test_quickstart_tiny_writes_report_and_metrics(tmp_path):
    """--pretrained runs the default quickstart and the pretrained one side by side."""
    out = tmp_path / "qs"
    assert main(["quickstart", "--tiny", "--pretrained", "--out", str(out), "--no-progress"]) == 0
    for name in ("default", "pretrained"):
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert {"caption", "vqa", "blind", "parameters", "wall_seconds"} <= set(metrics)
        tasks = {"caption", "vqa"} | ({"retrieval", "classify"} if name == "default" else set())
        assert tasks == set(metrics["blind"])
        assert "cider" in metrics["caption"] and "accuracy_by_type" in metrics["vqa"]
        report = (out / name / "report.md").read_text()
        assert "| vqa | accuracy |" in report and "pictures/vqa_0.png" in report
        assert len(list((out / name / "pictures").glob("*.png"))) == 4
    counts = json.loads((out / "pretrained" / "metrics.json").read_text())["parameters"]
    assert 0 < counts["caption"]["trainable"] < counts["caption"]["total"] / 3  # frozen parts
    retrieval = json.loads((out / "default" / "metrics.json").read_text())["retrieval"]
    assert {"i2t_r1", "t2i_r5", "itm_i2t_r1"} <= set(retrieval)
    report = (out / "default" / "report.md").read_text()
    assert "| retrieval | i2t_r1 |" in report and "| classify (text blanked) | accuracy |" in report
    assert (out / "default" / "confusion.png").is_file()
    side_by_side = (out / "report.md").read_text()
    assert "| vqa | accuracy |" in side_by_side and "efficientnet-lite0" in side_by_side


def test_question_attention_has_one_map_per_word(workspace):
    from vtfuse.pipeline import Pipeline

    pipe = Pipeline.load(workspace / "vqa")
    image = workspace / "data" / "images" / "000000.png"
    attention = pipe.question_attention(image, "what shape is the red object ?")
    layers, heads = pipe.model.config.text.depth, pipe.model.config.text.heads
    assert attention.words == ["what", "shape", "is", "the", "red", "object", "?"]
    assert attention.maps.shape == (7, layers, heads, 9)
    assert torch.allclose(attention.maps.sum(-1), torch.ones(7, layers, heads))


def test_train_vqa_warm_started_from_the_captioner(workspace, tmp_path, capsys):
    args = tiny_vqa_training(workspace, tmp_path / "vqa")
    assert main([*args, "--epochs", "1", "--init-from", str(workspace / "caption")]) == 0
    out = capsys.readouterr().out
    assert f"warm start from {workspace / 'caption' / 'best'}" in out
    run = json.loads((tmp_path / "vqa" / "run.json").read_text())
    assert run["train_config"]["init_from"] == str(workspace / "caption")


def test_train_with_the_pretrained_efficientnet_tokeniser(workspace, tmp_path, capsys):
    run = tmp_path / "effnet"
    data = workspace / "data"
    args = ["train", "--task", "caption", "--train", str(data / "caption_train.jsonl")]
    args += ["--out", str(run), "--config", str(workspace / "tiny.json")]
    args += ["--vision", "efficientnet-lite0", "--epochs", "1", "--no-progress"]
    assert main(args) == 0
    vision = json.loads((run / "run.json").read_text())["model"]["vision"]
    assert (vision["name"], vision["image_size"], vision["patch_size"]) == (
        "efficientnet-lite0",
        224,
        32,
    )
    assert "trainable" in capsys.readouterr().out
    image = next((data / "images").glob("*.png"))
    assert main(["caption", str(run), str(image)]) == 0


def test_train_a_pretrained_lm_with_eyes(workspace, gpt2_folder, tmp_path, capsys):
    """`--lm` end to end on a tiny GPT-2 saved like a hub model: only the fusion blocks and the
    vision encoder train and are saved; the loss falls; eval and caption read the run."""
    run, data = tmp_path / "lm", workspace / "data"
    args = ["train", "--task", "caption", "--train", str(data / "caption_train.jsonl")]
    args += ["--val", str(data / "caption_val.jsonl"), "--out", str(run)]
    args += ["--config", str(workspace / "tiny.json"), "--lm", str(gpt2_folder)]
    flags = ["--xattn-every", "2", "--epochs", "20", "--lr", "0.01", "--no-progress"]
    flags += ["--resampler", "4"]
    assert main([*args, *flags]) == 0
    out = capsys.readouterr().out
    model = json.loads((run / "run.json").read_text())["model"]
    assert model["lm"]["name"] == str(gpt2_folder) and model["lm"]["xattn_every"] == 2
    assert model["lm"]["resampler_latents"] == 4
    assert model["fusion"]["name"] == "gated_cross_attention"
    history = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [entry["val_loss"] for entry in history if "val_loss" in entry]
    assert losses[-1] < losses[0] - 0.2, losses  # learning, through the frozen LM
    from safetensors.torch import load_file

    saved = load_file(run / "best" / "model.safetensors")
    new = ("vision.", "resampler.")
    assert saved and all(n.startswith(new) or ".fusion." in n for n in saved)
    total, trainable = (float(x) for x in re.findall(r"([\d.]+)M", out.split("\n")[0])[:2])
    assert 0 < trainable < total

    image = next((data / "images").glob("*.png"))
    assert main(["caption", str(run), str(image), "--beam-size", "2"]) == 0
    assert capsys.readouterr().out.startswith(str(image))
    sample = ["caption", str(run), str(image), str(image), "--temperature", "1.5", "--top-p", "0.9"]
    drawn = []
    for _ in range(2):
        assert main([*sample, "--seed", "3"]) == 0
        drawn.append(capsys.readouterr().out)
    assert drawn[0] == drawn[1]  # seeded: repeatable
    picture = tmp_path / "where.png"
    assert main(["attention", str(run), str(image), "--out", str(picture)]) == 0
    assert picture.read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    shots = [f"{image}:a red circle in the top left.", f"{image}:a blue square."]
    assert main(["caption", str(run), str(image), "--shots", *shots]) == 0
    assert capsys.readouterr().out.startswith(str(image))
    metrics = tmp_path / "metrics.json"
    test = str(data / "caption_test.jsonl")
    assert main(["eval", str(run), "--data", test, "--metrics", str(metrics), "--no-progress"]) == 0
    assert json.loads(metrics.read_text())["cider"] > 0

    unfrozen = tmp_path / "unfrozen"
    flags = ["--epochs", "1", "--freeze", "none", "--max-minutes", "0.01", "--no-progress"]
    assert main([*args[:-4], "--out", str(unfrozen), *args[-2:], *flags]) == 0
    assert "lm.transformer.wte.weight" in load_file(unfrozen / "best" / "model.safetensors")


def test_lm_options_are_checked(workspace, capsys):
    data = workspace / "data" / "vqa_train.jsonl"
    base = ["train", "--train", str(data), "--out", "unused"]
    assert main([*base, "--task", "caption", "--xattn-every", "2"]) == 2
    assert "give --lm too" in capsys.readouterr().err
    assert main([*base, "--task", "caption", "--resampler", "8"]) == 2
    with pytest.raises(SystemExit):
        main([*base, "--task", "caption", "--freeze", "lm,text"])
    assert "unknown part(s) text" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["caption", "run", "image.png", "--shots", "no-caption.png"])
    assert "expected IMAGE:CAPTION" in capsys.readouterr().err
    image = str(next((workspace / "data" / "images").glob("*.png")))
    assert main(["caption", str(workspace / "caption"), image, "--shots", f"{image}:a cat"]) == 2
    assert "--shots needs a captioner built on a pretrained LM" in capsys.readouterr().err


def test_vqa_with_a_pretrained_question_encoder(workspace, gpt2_folder, tmp_path, capsys):
    run, data = tmp_path / "vqa_lm", workspace / "data"
    args = ["train", "--task", "vqa", "--train", str(data / "vqa_train.jsonl")]
    args += ["--out", str(run), "--config", str(workspace / "tiny.json")]
    args += ["--text-encoder", str(gpt2_folder), "--epochs", "1", "--no-progress"]
    assert main(args) == 0
    assert json.loads((run / "run.json").read_text())["model"]["lm"]["name"] == str(gpt2_folder)
    capsys.readouterr()
    image = str(next((data / "images").glob("*.png")))
    assert main(["ask", str(run), image, "what colour is the circle?", "--top-k", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    metrics = tmp_path / "metrics.json"
    test = str(data / "vqa_test.jsonl")
    assert main(["eval", str(run), "--data", test, "--metrics", str(metrics), "--no-progress"]) == 0
    assert 0 <= json.loads(metrics.read_text())["accuracy"] <= 1
    picture = tmp_path / "attention.png"
    question = ["--question", "is the red object on the left?"]
    assert main(["attention", str(run), image, "--out", str(picture), *question]) == 0
    assert picture.read_bytes()[:4] == b"\x89PNG"


def save_tiny_vit(tower: Path) -> Path:
    import transformers

    sizes = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    transformers.ViTModel(
        transformers.ViTConfig(image_size=32, patch_size=8, **sizes)
    ).save_pretrained(tower)
    return tower


def test_train_with_a_hugging_face_vision_tower(workspace, tmp_path):
    tower = save_tiny_vit(tmp_path / "tiny-vit")
    run, data = tmp_path / "vit", workspace / "data"
    args = ["train", "--task", "vqa", "--train", str(data / "vqa_train.jsonl"), "--out", str(run)]
    args += ["--config", str(workspace / "tiny.json"), "--vision", str(tower), "--epochs", "1"]
    assert main([*args, "--no-progress"]) == 0
    vision = json.loads((run / "run.json").read_text())["model"]["vision"]
    assert (vision["name"], vision["image_size"], vision["patch_size"]) == (str(tower), 32, 8)
    image = str(next((data / "images").glob("*.png")))
    assert main(["ask", str(run), image, "what colour is the circle?"]) == 0


@pytest.mark.parametrize(
    ("flag", "task", "use"),
    [("--lm", "caption", "caption"), ("--text-encoder", "vqa", "ask"), ("--vision", "vqa", "ask")],
)
def test_pretrained_parts_with_only_pickle_weights_need_allow_pickle(
    flag, task, use, workspace, gpt2_folder, pickle_only, tmp_path, capsys
):
    """A pretrained LM or vision tower whose folder holds only pytorch_model.bin is refused,
    naming the file and --allow-pickle, when training on it and when using the trained run."""
    original = save_tiny_vit(tmp_path / "tiny-vit") if flag == "--vision" else gpt2_folder
    pickled, run, data = pickle_only(original), tmp_path / "run", workspace / "data"
    args = ["train", "--task", task, "--train", str(data / f"{task}_train.jsonl")]
    args += ["--out", str(run), "--config", str(workspace / "tiny.json"), flag, str(pickled)]
    args += ["--epochs", "1", "--no-progress"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert str(pickled / "pytorch_model.bin") in error and "--allow-pickle" in error
    assert main([*args, "--allow-pickle"]) == 0
    image = str(next((data / "images").glob("*.png")))
    command = [use, str(run), image, *(["what colour is the circle?"] if use == "ask" else [])]
    capsys.readouterr()
    assert main(command) == 2
    assert "pytorch_model.bin is a pickle file" in capsys.readouterr().err
    assert main([*command, "--allow-pickle"]) == 0
    assert capsys.readouterr().out.strip()


def _parse_train(*flags: str):
    from vtfuse.cli.main import build_parser

    argv = ["train", "--task", "caption", "--train", "t.jsonl", "--out", "o", *flags]
    return build_parser().parse_args(argv)


def test_every_config_field_is_a_train_flag_or_set_by_a_named_one(capsys):
    """A new field in a config dataclass is a new flag; the few set otherwise say by what."""
    import dataclasses

    from vtfuse.cli.config_flags import HANDWRITTEN, MODEL_PARTS, config_flags
    from vtfuse.config import ModelConfig, TrainConfig

    generated = {(flag.part, flag.field) for flag in config_flags()}
    parts = {"": TrainConfig, "model": ModelConfig, **MODEL_PARTS}
    every = {
        (part, f.name)
        for part, cls in parts.items()
        for f in dataclasses.fields(cls)
        if not dataclasses.is_dataclass(f.type) and f.name not in MODEL_PARTS
    }
    assert generated | set(HANDWRITTEN) == every
    assert not generated & set(HANDWRITTEN)
    shown = train_help(capsys)
    for how in HANDWRITTEN.values():
        if how.startswith("--"):
            assert how in shown


def train_help(capsys) -> str:
    """`vtfuse train --help`, its lines joined."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_config_flags_override_the_config_file_and_carry_its_comments(tmp_path, capsys):
    from vtfuse.cli.train import configs_from_args

    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": {"text": {"dropout": 0.3}}, "train": {"lr": 0.01}}))
    args = _parse_train(
        "--config", str(config), "--text-dropout", "0.1", "--weight-decay", "0.2",
        "--vision-channels", "16,32", "--no-vision-pixel-shortcut", "--precision", "bf16",
    )  # fmt: skip
    model, train = configs_from_args(args)
    assert (model.text.dropout, model.vision.channels, model.vision.pixel_shortcut) == (
        0.1,
        (16, 32),
        False,
    )
    assert (train.weight_decay, train.lr, train.precision) == (0.2, 0.01, "bf16")  # lr: file's
    model, train = configs_from_args(_parse_train("--vision", "efficientnet-lite0"))
    assert model.vision.image_size == 224  # the preset
    model, _ = configs_from_args(
        _parse_train("--vision", "efficientnet-lite0", "--vision-image-size", "160")
    )
    assert model.vision.image_size == 160  # a config flag wins over the preset
    help_text = train_help(capsys)
    assert "--text-dropout DROPOUT Dropout on the attention weights and in the MLPs" in help_text
    assert "cosine decay ends at lr * min_lr_ratio (default: 0.05)" in help_text
    with pytest.raises(SystemExit):
        _parse_train("--precision", "fp16")
    with pytest.raises(SystemExit):
        _parse_train("--vision-channels", "16,x")
