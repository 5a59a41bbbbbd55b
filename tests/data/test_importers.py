"""`vtfuse data import`: small fixture files in each official format, one malformed record
each, read back through vtfuse's own JSONL reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import require_module
from vtfuse.cli.main import main
from vtfuse.data.bank import load_records
from vtfuse.data.importers import ImportOptions, import_dataset, outside_image_root
from vtfuse.data.jsonl import DataError, ImagePathRefused
from vtfuse.tasks import read_jsonl


def image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    return path


@pytest.fixture
def coco_images(tmp_path) -> Path:
    """Images 42 and 43 in the 2014 style, 44 in the 2017 style."""
    root = tmp_path / "coco"
    image(root / "val2014" / "COCO_val2014_000000000042.jpg")
    image(root / "train2014" / "COCO_train2014_000000000043.jpg")
    image(root / "val2017" / "000000000044.jpg")
    return root


def run(format_name: str, tmp_path: Path, **options) -> tuple[dict[str, list], list[str]]:
    """Import into tmp_path/out and read the files back, allowing the images' own folder
    (they stay where they were, outside out/, as `--image-root` allows)."""
    out = tmp_path / "out"
    written, skipped = import_dataset(format_name, ImportOptions(out=out, **options))
    task = "vqa" if format_name == "vqav2" else "caption"
    roots = [options.get("images") or tmp_path]
    read = {
        p.stem: [r.fields | {"path": r.image_path} for r in read_jsonl(p, task, roots=roots)]
        for p, _ in written
    }
    return read, skipped


def test_coco_karpathy_keeps_every_reference_and_sends_restval_to_train(coco_images, tmp_path):
    karpathy = {
        "dataset": "coco",
        "images": [
            {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "cocoid": 42,
             "split": "test", "sentences": [{"raw": "A cat."}, {"raw": "A small cat. "}]},
            {"filepath": "train2014", "filename": "COCO_train2014_000000000043.jpg",
             "cocoid": 43, "split": "restval", "sentences": [{"raw": "A dog."}]},
            {"filepath": "val2014", "filename": "COCO_val2014_000000000044.jpg", "cocoid": 44,
             "split": "val", "sentences": [{"raw": "A bird."}]},  # found by id: 2017 name
            {"filepath": "val2014", "filename": "COCO_val2014_000000000045.jpg", "cocoid": 45,
             "split": "val", "sentences": []},  # malformed: no sentences
        ],
    }  # fmt: skip
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(karpathy))
    splits, skipped = run("coco-karpathy", tmp_path, annotations=[path], images=coco_images)
    assert splits["test"][0]["captions"] == ["A cat.", "A small cat."]
    assert splits["train"][0]["path"].resolve().name == "COCO_train2014_000000000043.jpg"
    assert splits["val"][0]["path"].resolve().name == "000000000044.jpg"
    assert len(skipped) == 1 and "images[3]" in skipped[0] and "no sentences" in skipped[0]
    with pytest.raises(DataError, match=r"images\[3\].*--strict"):
        run("coco-karpathy", tmp_path, annotations=[path], images=coco_images, strict=True)


def test_flickr30k_karpathy(tmp_path):
    image(tmp_path / "flickr" / "1000.jpg")
    data = {"images": [
        {"filename": "1000.jpg", "split": "train", "sentences": [{"raw": "Two men."}]},
        {"filename": "missing.jpg", "split": "train", "sentences": [{"raw": "x"}]},
    ]}  # fmt: skip
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps(data))
    splits, skipped = run(
        "flickr30k-karpathy", tmp_path, annotations=[path], images=tmp_path / "flickr"
    )
    assert splits["train"][0]["captions"] == ["Two men."]
    assert "missing.jpg not found" in skipped[0]


def test_official_coco_captions_take_their_split_from_the_file_name(coco_images, tmp_path):
    data = {
        "images": [{"id": 44, "file_name": "000000000044.jpg"}],
        "annotations": [
            {"image_id": 44, "caption": "A bird on a wire."},
            {"image_id": 44, "caption": "A small bird."},
            {"image_id": 44},  # malformed
        ],
    }
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps(data))
    splits, skipped = run("coco", tmp_path, annotations=[path], images=coco_images)
    assert splits["val"][0]["captions"] == ["A bird on a wire.", "A small bird."]
    assert "annotations[2]" in skipped[0]


def test_vqav2_keeps_all_answers_the_most_common_and_the_type(coco_images, tmp_path):
    questions = {"questions": [
        {"image_id": 42, "question": "What animal is this?", "question_id": 1},
        {"image_id": 43, "question": "Is it sunny?", "question_id": 2},
        {"image_id": 42, "question_id": 3},  # malformed: no text
    ]}  # fmt: skip
    answers = ["cat"] * 6 + ["kitten"] * 3 + ["dog"]
    annotations = {"annotations": [
        {"question_id": 1, "image_id": 42, "answer_type": "other",
         "answers": [{"answer": a} for a in answers]},
        {"question_id": 2, "image_id": 43, "answer_type": "yes/no",
         "answers": [{"answer": "yes"}] * 10},
    ]}  # fmt: skip
    q = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    a = tmp_path / "v2_mscoco_val2014_annotations.json"
    q.write_text(json.dumps(questions))
    a.write_text(json.dumps(annotations))
    splits, skipped = run("vqav2", tmp_path, annotations=[a], questions=q, images=coco_images)
    first, second = splits["val"]
    assert (first["answer"], first["answers"], first["type"]) == ("cat", answers, "other")
    assert (second["answer"], second["type"]) == ("yes", "yes/no")
    assert len(skipped) == 1 and "questions[2]" in skipped[0]


@pytest.mark.parametrize("delimiter, name", [(",", "csv"), ("\t", "tsv")])
def test_csv_and_tsv_group_captions_by_image(tmp_path, delimiter, name):
    image(tmp_path / "pics" / "a.png")
    rows = ["file,text", "a.png,A red square.", "a.png,Red.", "b.png,Missing image.", "a.png,"]
    table = tmp_path / f"captions.{name}"
    table.write_text("\n".join(r.replace(",", delimiter) for r in rows) + "\n")
    splits, skipped = run(
        name, tmp_path, annotations=[table], images=tmp_path / "pics", image_column="file",
        text_column="text",
    )  # fmt: skip
    assert splits["data"][0]["captions"] == ["A red square.", "Red."]
    assert len(skipped) == 2 and f"captions.{name}:4" in skipped[0]
    with pytest.raises(DataError, match=r"no column.*caption"):
        run(name, tmp_path, annotations=[table], image_column="file")


def test_a_saved_hugging_face_dataset(tmp_path):
    datasets = require_module("datasets")
    pictures = [Image.new("RGB", (8, 8), c) for c in ("red", "blue", "green")]
    table = datasets.Dataset.from_dict(
        {"image": pictures, "caption": ["a red square.", "a blue square.", None]}
    ).cast_column("image", datasets.Image())
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": table.select([0, 1]), "validation": table.select([2])}
    ).save_to_disk(saved)
    splits, skipped = run("hf", tmp_path, annotations=[saved])
    assert [e["captions"] for e in splits["train"]] == [["a red square."], ["a blue square."]]
    assert Image.open(splits["train"][1]["path"]).getpixel((0, 0)) == (0, 0, 255)
    assert "val" not in splits and "[validation][0]" in skipped[0]


def one_cat_karpathy_file(folder: Path) -> Path:
    """A Karpathy-split file of one val image (COCO 42) with one caption."""
    data = {"images": [{"filename": "COCO_val2014_000000000042.jpg", "cocoid": 42,
                        "split": "val", "sentences": [{"raw": "A cat."}]}]}  # fmt: skip
    path = folder / "dataset_coco.json"
    path.write_text(json.dumps(data))
    return path


def test_the_command_line_reports_counts_and_skips(coco_images, tmp_path, capsys):
    path = one_cat_karpathy_file(tmp_path)
    out = tmp_path / "imported"
    args = ["data", "import", "coco-karpathy", "--annotations", str(path)]
    assert main([*args, "--images", str(coco_images), "--out", str(out), "--copy-images"]) == 0
    assert f"{out / 'val.jsonl'}  1 examples" in capsys.readouterr().out
    line = json.loads((out / "val.jsonl").read_text())
    assert line["image"] == "images/COCO_val2014_000000000042.jpg"  # copied beside the JSONL
    path.write_text("{not json")
    assert main([*args, "--out", str(out)]) == 2
    assert "dataset_coco.json: not valid JSON" in capsys.readouterr().err


def test_imported_paths_outside_the_output_need_their_folder_allowed(coco_images, tmp_path):
    """The importer keeps the images where they are (reached through '..'); the loader refuses
    them until their folder is given as an image root, which `outside_image_root` finds."""
    path = one_cat_karpathy_file(tmp_path)
    options = ImportOptions(out=tmp_path / "out", annotations=[path], images=coco_images)
    written, _ = import_dataset("coco-karpathy", options)
    files = [p for p, _ in written]
    assert json.loads(files[0].read_text())["image"].startswith("../coco/")
    assert outside_image_root(files) == (coco_images / "val2014").resolve()
    records = read_jsonl(files[0], "caption")
    with pytest.raises(ImagePathRefused, match=r"val\.jsonl:1: image path '\.\./coco/"):
        load_records(records, 8, progress=False)
    allowed = read_jsonl(files[0], "caption", roots=[outside_image_root(files)])
    assert len(load_records(allowed, 8, progress=False).records) == 1
    copied = import_dataset("coco-karpathy", options, copy_images=True)[0]
    assert outside_image_root([p for p, _ in copied]) is None


def test_the_command_line_names_the_image_root_to_allow(coco_images, tmp_path, capsys):
    path = one_cat_karpathy_file(tmp_path)
    out = tmp_path / "imported"
    args = ["data", "import", "coco-karpathy", "--annotations", str(path)]
    assert main([*args, "--images", str(coco_images), "--out", str(out)]) == 0
    root = (coco_images / "val2014").resolve()
    assert f"--image-root {root}" in capsys.readouterr().out
