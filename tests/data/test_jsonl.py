"""The JSONL format, image loading, the tokenizer, batching and the synthetic scenes."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from vtfuse.data.bank import load_records
from vtfuse.data.images import ImageLoadError, image_to_uint8, load_image, normalise
from vtfuse.data.items import TextTruncated, collate, grouped_order
from vtfuse.data.jsonl import DataError, ImagePathRefused
from vtfuse.data.synth import (
    TASKS,
    SceneObject,
    SynthSpec,
    captions,
    generate,
    parse_caption,
    position_name,
    questions,
    sample_scene,
)
from vtfuse.data.tokenizer import Tokenizer, normalise_answer, split_words
from vtfuse.tasks import read_jsonl, task_dataset

SIZE = 16


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def save_image(path: Path, colour=(200, 30, 30), size=(20, 10)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


# -- read_jsonl ------------------------------------------------------------------------------
def test_read_jsonl_reads_valid_lines_with_their_numbers(tmp_path):
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"image": "a.png", "caption": "a red square."},
            "",
            {
                "image": "b.png",
                "captions": ["one.", "two."],
                "boxes": [{"label": "red", "box": [0, 1, 2, 3.5]}],
            },
        ],
    )
    records = read_jsonl(path, "caption")
    assert [r.line for r in records] == [1, 3]
    assert records[0].captions == ["a red square."]
    assert records[1].captions == ["one.", "two."]
    assert records[1].where == f"{path}:3"
    assert records[1].image_path == tmp_path / "b.png"


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl", [{"image": "a.png", "caption": "x"}, '{"image": "a.png", ']
    )
    with pytest.raises(DataError) as info:
        read_jsonl(path, "caption")
    assert str(path) in str(info.value)
    assert f"{path}:2:" in str(info.value)
    assert "not valid JSON" in str(info.value)


def test_non_object_line_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "list.jsonl", ['["image", "caption"]'])
    with pytest.raises(DataError, match=r":1: expected a JSON object, got list"):
        read_jsonl(path, "caption")


@pytest.mark.parametrize(
    "task,fields,missing",
    [
        ("caption", {"caption": "a cat."}, "image"),
        ("caption", {"image": "a.png"}, "caption"),
        ("vqa", {"question": "what?", "answer": "yes"}, "image"),
        ("vqa", {"image": "a.png", "answer": "yes"}, "question"),
        ("vqa", {"image": "a.png", "question": "what?"}, "answer"),
    ],
)
def test_missing_field_is_named_with_line(tmp_path, task, fields, missing):
    good = (
        {"image": "a.png", "caption": "x"}
        if task == "caption"
        else {"image": "a.png", "question": "q?", "answer": "a"}
    )
    path = write_jsonl(tmp_path / "data.jsonl", [good, good, fields])
    with pytest.raises(DataError) as info:
        read_jsonl(path, task)
    message = str(info.value)
    assert f"{path}:3:" in message
    assert f"missing field '{missing}'" in message


def test_unlabelled_files_need_no_answer_or_caption(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"image": "a.png", "question": "what?"}])
    assert len(read_jsonl(path, "vqa", labelled=False)) == 1
    path = write_jsonl(tmp_path / "c.jsonl", [{"image": "a.png"}])
    assert len(read_jsonl(path, "caption", labelled=False)) == 1


@pytest.mark.parametrize(
    "fields,problem",
    [
        ({"image": 3, "caption": "x"}, "'image' must be a path string"),
        ({"image": "a.png", "caption": ["x"]}, "field 'caption' must be a string"),
        ({"image": "a.png", "captions": []}, "'captions' must be a non-empty list of strings"),
        (
            {"image": "a.png", "captions": ["x", 2]},
            "'captions' must be a non-empty list of strings",
        ),
    ],
)
def test_wrong_field_types_are_refused(tmp_path, fields, problem):
    path = write_jsonl(tmp_path / "data.jsonl", [fields])
    with pytest.raises(DataError) as info:
        read_jsonl(path, "caption")
    assert f"{path}:1: " in str(info.value)
    assert problem in str(info.value)


@pytest.mark.parametrize(
    "boxes,problem",
    [
        ({"label": "red", "box": [0, 0, 1, 1]}, "field 'boxes' must be a list"),
        (["red"], "boxes[0] needs a string 'label'"),
        ([{"box": [0, 0, 1, 1]}], "boxes[0] needs a string 'label'"),
        ([{"label": 3, "box": [0, 0, 1, 1]}], "boxes[0] needs a string 'label'"),
        (
            [{"label": "a", "box": [0, 0, 1, 1]}, {"label": "b", "box": [0, 0, 1]}],
            "boxes[1].box must be",
        ),
        ([{"label": "a", "box": "0 0 1 1"}], "boxes[0].box must be"),
        ([{"label": "a", "box": [0, 0, "1", 1]}], "boxes[0].box must hold four numbers"),
        ([{"label": "a", "box": [0, 0, True, 1]}], "boxes[0].box must hold four numbers"),
    ],
)
def test_bad_boxes_are_rejected(tmp_path, boxes, problem):
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [{"image": "a.png", "question": "q?", "answer": "a", "boxes": boxes}],
    )
    with pytest.raises(DataError) as info:
        read_jsonl(path, "vqa")
    assert f"{path}:1: {problem}" in str(info.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="dataset file not found"):
        read_jsonl(tmp_path / "nope.jsonl", "caption")
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="no examples"):
        read_jsonl(path, "caption")


# -- load_records ------------------------------------------------------------------------------
@pytest.fixture
def dataset_with_bad_images(tmp_path):
    save_image(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image at all" * 3)
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"image": "good.png", "caption": "one."},
            {"image": "corrupt.png", "caption": "two."},
            {"image": "missing.png", "caption": "three."},
            {"image": "good.png", "caption": "four."},
        ],
    )
    return path


def test_corrupt_image_names_line_and_image(dataset_with_bad_images):
    path = dataset_with_bad_images
    with pytest.raises(DataError) as info:
        load_records(read_jsonl(path, "caption"), SIZE, progress=False)
    message = str(info.value)
    assert f"{path}:2" in message
    assert "corrupt.png" in message
    assert "cannot decode image" in message


def test_missing_image_names_line_and_image(tmp_path):
    save_image(tmp_path / "good.png")
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [{"image": "good.png", "caption": "one."}, {"image": "sub/missing.png", "caption": "two."}],
    )
    with pytest.raises(DataError) as info:
        load_records(read_jsonl(path, "caption"), SIZE, progress=False)
    message = str(info.value)
    assert f"{path}:2" in message
    assert "image not found" in message
    assert "missing.png" in message


def test_skip_bad_skips_and_counts(dataset_with_bad_images):
    path = dataset_with_bad_images
    data = load_records(read_jsonl(path, "caption"), SIZE, skip_bad=True, progress=False)
    assert [r.line for r in data.records] == [1, 4]
    assert len(data.skipped) == 2
    assert f"{path}:2" in data.skipped[0] and "corrupt.png" in data.skipped[0]
    assert f"{path}:3" in data.skipped[1] and "missing.png" in data.skipped[1]
    # the same image file is decoded once and shared
    assert data.image_ids == [0, 0]
    assert len(data.bank.tensors) == 1
    assert data.bank.original_sizes == [(20, 10)]


def test_a_path_is_checked_against_its_own_files_folder_however_often_it_is_named(tmp_path):
    """Lines naming one picture share its check and row; the same words in a file in another
    folder lead elsewhere (here out of that folder through a link) and are checked again."""
    inside, linked = tmp_path / "inside", tmp_path / "linked"
    for folder in (inside, linked):
        folder.mkdir()
    save_image(inside / "pic.png")
    (linked / "pic.png").symlink_to(inside / "pic.png")
    lines = [{"image": "pic.png", "caption": "one."}, {"image": "./pic.png", "caption": "two."}]
    records = read_jsonl(write_jsonl(inside / "a.jsonl", lines), "caption")
    data = load_records(records * 3, SIZE, progress=False)
    assert data.image_ids == [0] * 6 and len(data.bank.tensors) == 1
    outside = read_jsonl(write_jsonl(linked / "b.jsonl", lines[:1]), "caption")
    with pytest.raises(ImagePathRefused, match="symbolic link"):
        load_records(records + outside, SIZE, progress=False)


def test_all_images_bad_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"image": "missing.png", "caption": "x"}])
    with pytest.raises(DataError, match="no example has a readable image"):
        load_records(read_jsonl(path, "caption"), SIZE, skip_bad=True, progress=False)


def _palette_image():
    image = Image.new("P", (12, 12), 1)
    image.putpalette([0, 0, 0, 10, 200, 60] + [0] * (256 * 3 - 6))
    return image


@pytest.mark.parametrize(
    "name,make,expected,tolerance",
    [
        ("grey.png", lambda: Image.new("L", (12, 9), 100), (100, 100, 100), 0),
        ("alpha.png", lambda: Image.new("RGBA", (12, 9), (10, 20, 30, 128)), (10, 20, 30), 0),
        ("palette.png", _palette_image, (10, 200, 60), 0),
        ("cmyk.tiff", lambda: Image.new("CMYK", (12, 9), (255, 0, 0, 0)), (0, 255, 255), 0),
        ("cmyk.jpg", lambda: Image.new("CMYK", (16, 16), (0, 0, 0, 100)), (155, 155, 155), 3),
        ("rgb.jpg", lambda: Image.new("RGB", (16, 16), (40, 80, 220)), (40, 80, 220), 4),
    ],
)
def test_image_modes_load_as_rgb_uint8(tmp_path, name, make, expected, tolerance):
    original = make()
    original.save(tmp_path / name)
    assert Image.open(tmp_path / name).mode == original.mode
    path = write_jsonl(tmp_path / "data.jsonl", [{"image": name, "caption": "x"}])
    data = load_records(read_jsonl(path, "caption"), SIZE, progress=False)
    tensor = data.bank.tensors[0]
    assert tensor.dtype == torch.uint8
    assert tensor.shape == (3, SIZE, SIZE)
    colour = torch.tensor(expected, dtype=torch.int16)[:, None, None]
    assert (tensor.to(torch.int16) - colour).abs().max() <= tolerance
    assert data.bank.original_sizes == [original.size]


def test_image_helpers(tmp_path):
    with pytest.raises(ImageLoadError, match="image not found"):
        load_image(tmp_path / "nope.png")
    image = Image.new("RGB", (4, 2))
    image.putpixel((3, 0), (255, 0, 0))
    tensor = image_to_uint8(image, 8)
    assert tensor.shape == (3, 8, 8) and tensor.dtype == torch.uint8
    assert tensor[0, 0, -1] == 255 and tensor[0, -1, 0] == 0  # x → width axis, y → height axis
    values = normalise(torch.tensor([[[[0, 255]]]], dtype=torch.uint8))
    torch.testing.assert_close(values, torch.tensor([[[[-1.0, 1.0]]]]))


# -- tokenizer ---------------------------------------------------------------------------------
def test_split_words_and_answers():
    assert split_words("A red, Circle.") == ["a", "red", ",", "circle", "."]
    assert split_words("It's 2 squares!") == ["it's", "2", "squares", "!"]
    assert normalise_answer("  Circle ") == "circle"
    assert normalise_answer("Top-Left") == "top - left"


def test_tokenizer_round_trip(tmp_path):
    tokenizer = Tokenizer.build(
        ["A red circle, a blue square.", "Is it red?"], answers=["Yes", "no", "yes", "2"]
    )
    assert tokenizer.words[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert len(tokenizer) == 4 + len(
        {"a", "red", "circle", ",", "blue", "square", ".", "is", "it", "?"}
    )
    ids = tokenizer.encode("A blue circle, a red square.", bos=True, eos=True)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids) == "a blue circle, a red square."
    assert tokenizer.decode(tokenizer.encode("is it red ?")) == "is it red?"
    # unknown words become <unk>, which decodes to nothing
    unknown = tokenizer.encode("a green circle")
    assert unknown[1] == tokenizer.unk_id
    assert tokenizer.tokens(unknown) == ["a", "circle"]
    # decoding stops at the first <eos> and drops padding
    assert tokenizer.decode(
        [*tokenizer.encode("red square"), tokenizer.eos_id, *tokenizer.encode("blue")]
    ) == ("red square")
    assert tokenizer.decode([tokenizer.bos_id, *tokenizer.encode("red"), 0, 0]) == "red"
    # answers
    assert tokenizer.answers == ["2", "no", "yes"]
    assert tokenizer.answer_id("YES") == tokenizer.answers.index("yes")
    assert tokenizer.answer_id(" 2 ") == 0
    assert tokenizer.answer_id("maybe") == -1
    # save / load
    tokenizer.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.words == tokenizer.words and loaded.answers == tokenizer.answers
    assert loaded.encode("a red square.") == tokenizer.encode("a red square.")


def test_tokenizer_min_count_and_vocabulary_check():
    tokenizer = Tokenizer.build(["red red blue"], min_count=2)
    assert tokenizer.words == ["<pad>", "<bos>", "<eos>", "<unk>", "red"]
    with pytest.raises(ValueError, match="must start with"):
        Tokenizer(["red", "<pad>"])


# -- datasets and collate ----------------------------------------------------------------------
def item(image_id, tokens, answer=None):
    out = {
        "image_id": image_id,
        "images": torch.full((3, 4, 4), image_id, dtype=torch.uint8),
        "tokens": torch.tensor(tokens),
    }
    if answer is not None:
        out["answers"] = torch.tensor(answer)
    return out


def test_collate_dedupes_images():
    batch = collate([item(7, [5, 6, 7], 1), item(7, [8], 0)])
    assert batch["images"].shape == (1, 3, 4, 4)
    assert batch["image_index"].tolist() == [0, 0]
    assert batch["tokens"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["token_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert batch["answers"].tolist() == [1, 0]


def test_collate_maps_each_example_to_its_image_row():
    batch = collate([item(3, [4]), item(9, [4, 5]), item(3, [6]), item(1, [7])])
    assert batch["images"].shape == (3, 3, 4, 4)
    assert batch["image_index"].tolist() == [0, 1, 0, 2]
    assert [int(image[0, 0, 0]) for image in batch["images"]] == [3, 9, 1]
    assert "answers" not in batch


def test_grouped_order_keeps_an_images_examples_together():
    image_ids = [0, 1, 0, 2, 1, 0]
    order = grouped_order(image_ids, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(6))
    runs = [image_ids[i] for i in order]
    changes = sum(a != b for a, b in itertools.pairwise(runs))
    assert changes == 2  # three images, each one contiguous run
    again = grouped_order(image_ids, torch.Generator().manual_seed(0))
    assert again == order


def test_grouped_order_caps_the_examples_of_an_image_a_group():
    """20 questions an image, groups of at most 4: every example once, and a batch of 64 then
    holds about 16 images (two groups of one image may meet), not 3 as whole groups do."""
    image_ids = [i // 20 for i in range(4000)]

    def images_a_batch(order: list[int]) -> list[int]:
        return [len({image_ids[i] for i in order[s : s + 64]}) for s in range(0, 3968, 64)]

    order = grouped_order(image_ids, torch.Generator().manual_seed(1), per_group=4)
    assert sorted(order) == list(range(4000))
    assert min(images_a_batch(order)) >= 14 and max(images_a_batch(order)) <= 17
    whole = grouped_order(image_ids, torch.Generator().manual_seed(1))
    assert max(images_a_batch(whole)) <= 5
    with pytest.raises(ValueError, match="examples_per_image"):
        grouped_order(image_ids, torch.Generator(), per_group=-1)


def test_caption_and_vqa_datasets(tmp_path):
    save_image(tmp_path / "a.png")
    caption_file = write_jsonl(
        tmp_path / "c.jsonl", [{"image": "a.png", "captions": ["red.", "a red one."]}]
    )
    data = load_records(read_jsonl(caption_file, "caption"), SIZE, progress=False)
    tokenizer = Tokenizer.build(["a red one."])
    captions_set = task_dataset("caption", data, tokenizer, max_length=4)
    assert len(captions_set) == 2 and captions_set.image_ids == [0, 0]
    assert (
        captions_set[1]["tokens"].tolist() == tokenizer.encode("a red one.", bos=True, eos=True)[:4]
    )

    vqa_file = write_jsonl(
        tmp_path / "q.jsonl",
        [
            {"image": "a.png", "question": "what colour?", "answer": "Red"},
            {"image": "a.png", "question": "what?", "answer": "never seen"},
        ],
    )
    data = load_records(read_jsonl(vqa_file, "vqa"), SIZE, progress=False)
    tokenizer = Tokenizer.build(["what colour?"], answers=["red", "blue"])
    questions_set = task_dataset("vqa", data, tokenizer, max_length=8)
    assert questions_set[0]["answers"].item() == tokenizer.answers.index("red")
    assert questions_set[1]["answers"].item() == -1
    batch = collate([questions_set[0], questions_set[1]])
    assert batch["images"].shape == (1, 3, SIZE, SIZE)
    assert batch["image_index"].tolist() == [0, 0]


# -- over-long texts ---------------------------------------------------------------------------
LONG = " ".join(["red"] * 30) + "."


@pytest.mark.parametrize(
    ("task", "line", "limit", "texts"),
    [
        ("caption", {"captions": ["a red one.", LONG]}, 8, "caption"),
        ("retrieval", {"caption": LONG}, 7, "caption"),
        ("vqa", {"question": LONG, "answer": "red"}, 7, "question"),
        ("classify", {"text": LONG, "label": "true"}, 7, "text"),
    ],
)
def test_over_long_texts_are_cut_with_one_summary_warning(tmp_path, task, line, limit, texts):
    save_image(tmp_path / "a.png")
    short = {k: (["red."] if isinstance(v, list) else "red.") for k, v in line.items()}
    short |= {k: v for k, v in line.items() if k in ("answer", "label")}
    lines = [{"image": "a.png", **short}, *[{"image": "a.png", **line}] * 3]
    data = load_records(
        read_jsonl(write_jsonl(tmp_path / "d.jsonl", lines), task), SIZE, progress=False
    )
    tokenizer = Tokenizer.build([LONG, "a red one."], answers=["red", "true"])
    with pytest.warns(TextTruncated) as caught:
        dataset = task_dataset(task, data, tokenizer, max_length=8)
    (message,) = [str(w.message) for w in caught if issubclass(w.category, TextTruncated)]
    assert f"3 {texts}(s) longer than the model's text.max_length of 8 tokens" in message
    assert f"the first: {tmp_path / 'd.jsonl'}:2" in message
    assert max(len(item["tokens"]) for item in dataset) == limit


def test_texts_that_fit_raise_no_warning(tmp_path, recwarn):
    save_image(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "d.jsonl", [{"image": "a.png", "caption": "a red one."}])
    data = load_records(read_jsonl(path, "caption"), SIZE, progress=False)
    task_dataset("caption", data, Tokenizer.build(["a red one."]), max_length=6)
    assert not [w for w in recwarn if issubclass(w.category, TextTruncated)]


def test_an_over_long_question_is_answered_and_evaluated_with_one_warning(tmp_path):
    from vtfuse.config import ModelConfig, TextConfig, VisionConfig
    from vtfuse.evaluation import EvalOptions, evaluate
    from vtfuse.models import create_model
    from vtfuse.pipeline import Pipeline

    tokenizer = Tokenizer.build([LONG, "what colour?"], answers=["red", "blue"])
    config = ModelConfig(
        task="vqa",
        vision=VisionConfig(image_size=24, channels=(8, 8, 16), dim=32, depth=1, heads=2),
        text=TextConfig(vocab_size=len(tokenizer), dim=32, depth=1, heads=2, max_length=8),
        num_answers=2,
    )
    create_model(config).save_pretrained(tmp_path / "model", tokenizer)
    pipe = Pipeline.load(tmp_path / "model", "cpu")
    image = save_image(tmp_path / "a.png")
    with pytest.warns(TextTruncated, match=r"1 text\(s\) longer .* of 8 tokens"):
        assert len(pipe.ask(image, LONG, top_k=2)) == 2
    lines = [{"image": "a.png", "question": q, "answer": "red"} for q in ("what colour?", LONG)]
    path = write_jsonl(tmp_path / "q.jsonl", lines * 40)  # several batches
    with pytest.warns(TextTruncated) as caught:
        metrics = evaluate(tmp_path / "model", path, EvalOptions(batch_size=8, progress=False))
    assert metrics["examples"] == 80
    assert [str(w.message) for w in caught if issubclass(w.category, TextTruncated)] == [
        "40 question(s) longer than the model's text.max_length of 8 tokens truncated to fit "
        f"(the first: {path}:2)"
    ]


# -- synthetic data ----------------------------------------------------------------------------
def folder_contents(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def synth_folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("synth")
    counts = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        counts[name] = generate(base / name, SynthSpec(images=20, seed=seed), progress=False)
    return base, counts


def test_synth_is_deterministic_for_a_seed(synth_folders):
    base, counts = synth_folders
    a, b, c = (folder_contents(base / n) for n in "abc")
    assert len([k for k in a if k.startswith("images")]) == 20
    assert set(a) == {
        *(f"{t}_{s}.jsonl" for t in TASKS for s in ("train", "val", "test")),
        *(f"images/{i:06d}.png" for i in range(20)),
    }
    assert a == b
    assert counts["a"] == counts["b"]
    assert set(c) == set(a)
    assert a["caption_train.jsonl"] != c["caption_train.jsonl"]
    assert a["vqa_train.jsonl"] != c["vqa_train.jsonl"]
    assert any(a[k] != c[k] for k in a if k.startswith("images"))


def test_synth_lines(synth_folders):
    base, all_counts = synth_folders
    folder, counts = base / "a", all_counts["a"]
    assert (
        counts["caption_train"] == 16 and counts["caption_val"] == 2 and counts["caption_test"] == 2
    )
    for split in ("train", "val", "test"):
        caption_lines = [
            json.loads(x) for x in (folder / f"caption_{split}.jsonl").read_text().splitlines()
        ]
        vqa_lines = [
            json.loads(x) for x in (folder / f"vqa_{split}.jsonl").read_text().splitlines()
        ]
        assert len(vqa_lines) == counts[f"vqa_{split}"]
        for line in caption_lines:
            assert "objects" in line and "boxes" in line
            assert (folder / line["image"]).is_file()
            assert len(line["boxes"]) == len(line["objects"])
            facts = {(o["colour"], o["shape"], o["position"]) for o in line["objects"]}
            assert len(line["captions"]) == 2
            for caption in line["captions"]:
                assert parse_caption(caption) == facts
            for obj, box in zip(line["objects"], line["boxes"], strict=True):
                assert box == {"label": obj["colour"], "box": obj["box"]}
                x0, y0, x1, y1 = obj["box"]
                assert 0 <= x0 < x1 <= 72 and 0 <= y0 < y1 <= 72
        for line in vqa_lines:
            assert line["type"] in {"non-relational", "relational"}
            assert isinstance(line["question"], str) and isinstance(line["answer"], str)
            subject = line["boxes"][0]["label"]
            assert f"the {subject} object" in line["question"]
        kinds = {line["type"] for line in vqa_lines}
        assert kinds == {"non-relational", "relational"}
        # the generated files are valid dataset files
        assert len(read_jsonl(folder / f"caption_{split}.jsonl", "caption")) == len(caption_lines)
        assert len(read_jsonl(folder / f"vqa_{split}.jsonl", "vqa")) == len(vqa_lines)


def test_synth_rejects_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="objects per image"):
        generate(tmp_path, SynthSpec(images=1, min_objects=4, max_objects=3), progress=False)
    with pytest.raises(ValueError, match="unknown shape"):
        generate(tmp_path, SynthSpec(images=1, shapes=("square", "hexagon")), progress=False)


def test_position_names():
    assert position_name(0, 0) == "top left"
    assert position_name(0, 1) == "top"
    assert position_name(1, 0) == "left"
    assert position_name(1, 1) == "center"
    assert position_name(2, 2) == "bottom right"


@pytest.mark.parametrize("seed", range(20))
def test_parse_caption_inverts_captions(seed):
    rng = random.Random(seed)
    objects = sample_scene(rng, 72, rng.randint(1, 6), ("square", "circle", "triangle"))
    facts = {(o.colour, o.shape, o.position) for o in objects}
    first, second = captions(objects)
    assert second.startswith("there is ")
    assert parse_caption(first) == facts
    assert parse_caption(second) == facts
    assert parse_caption(first.upper()) == facts


def test_parse_caption_by_hand():
    assert parse_caption("an orange circle in the center and a red square at the bottom left.") == {
        ("orange", "circle", "center"),
        ("red", "square", "bottom left"),
    }
    assert parse_caption("a red thing, a square.") == set()


def obj(colour, shape, row, col, size=90):
    cell = size / 3
    return SceneObject(colour, shape, row, col, ((col + 0.5) * cell, (row + 0.5) * cell), 10.0)


def test_questions_on_a_hand_built_scene():
    # red (15, 15), green (75, 15), blue (15, 45), yellow (75, 75); the margin is 0.08 · 90 = 7.2
    red, green = obj("red", "square", 0, 0), obj("green", "circle", 0, 2)
    blue, yellow = obj("blue", "square", 1, 0), obj("yellow", "triangle", 2, 2)
    scene = [red, green, blue, yellow]
    assert captions(scene)[0] == (
        "a red square at the top left, a green circle at the top right, a blue square on the left "
        "and a yellow triangle at the bottom right."
    )
    asked = questions(scene, random.Random(0), per_kind=100, size=90)
    answers = {q["question"]: (q["answer"], q["type"]) for q in asked}
    assert len(answers) == len(asked)
    expected = {
        "What shape is the red object?": ("square", "non-relational"),
        "Is the red object on the left or on the right?": ("left", "non-relational"),
        "Is the red object at the top or at the bottom?": ("top", "non-relational"),
        "What shape is the green object?": ("circle", "non-relational"),
        "Is the green object on the left or on the right?": ("right", "non-relational"),
        "Is the green object at the top or at the bottom?": ("top", "non-relational"),
        "What shape is the blue object?": ("square", "non-relational"),
        "Is the blue object on the left or on the right?": ("left", "non-relational"),
        "What shape is the yellow object?": ("triangle", "non-relational"),
        "Is the yellow object on the left or on the right?": ("right", "non-relational"),
        "Is the yellow object at the top or at the bottom?": ("bottom", "non-relational"),
        # red: blue at 30 is closest, yellow at 84.9 furthest
        "What shape is the object closest to the red object?": ("square", "relational"),
        "What shape is the object furthest from the red object?": ("triangle", "relational"),
        # blue: red at 30 is closest; green and yellow tie for furthest (not asked)
        "What shape is the object closest to the blue object?": ("square", "relational"),
        # yellow: red at 84.9 is furthest; green (60) is not 7.2 closer than blue (67.1)
        "What shape is the object furthest from the yellow object?": ("square", "relational"),
        "How many objects have the same shape as the red object?": ("2", "relational"),
        "How many objects have the same shape as the green object?": ("1", "relational"),
        "How many objects have the same shape as the blue object?": ("2", "relational"),
        "How many objects have the same shape as the yellow object?": ("1", "relational"),
    }
    assert answers == expected
    for q in asked:
        subject = next(o for o in scene if f"the {o.colour} object" in q["question"])
        assert q["boxes"] == [{"label": subject.colour, "box": subject.box}]
    assert red.box == [5.0, 5.0, 25.0, 25.0]
    assert red.to_json() == {
        "colour": "red",
        "shape": "square",
        "position": "top left",
        "box": red.box,
    }


def test_questions_are_sampled_per_kind():
    scene = [obj("red", "square", 0, 0), obj("green", "circle", 0, 2), obj("blue", "square", 1, 0)]
    asked = questions(scene, random.Random(1), per_kind=2, size=90)
    kinds = [q["type"] for q in asked]
    assert kinds.count("non-relational") == 2 and kinds.count("relational") == 2


# -- regressions for bugs found while writing these tests ---------------------------------
def test_vqa_dataset_leaves_room_for_the_cls_position(tmp_path):
    from vtfuse.config import ModelConfig, TextConfig, VisionConfig
    from vtfuse.models import create_model

    save_image(tmp_path / "a.png")
    question = "what is the shape of the red object in this picture ?"
    path = write_jsonl(
        tmp_path / "q.jsonl", [{"image": "a.png", "question": question, "answer": "circle"}]
    )
    tokenizer = Tokenizer.build([question], answers=["circle"])
    config = ModelConfig(
        task="vqa",
        vision=VisionConfig(image_size=24, channels=(8, 8, 16), dim=32, depth=1, heads=2),
        text=TextConfig(vocab_size=len(tokenizer), dim=32, depth=1, heads=2, max_length=8),
        num_answers=1,
    )
    torch.manual_seed(0)
    model = create_model(config)
    dataset = task_dataset(
        "vqa", load_records(read_jsonl(path, "vqa"), 24, progress=False), tokenizer, 8
    )
    loss = model.training_loss(collate([dataset[0]]))  # ValueError: 9 tokens > text.max_length 8
    assert torch.isfinite(loss)


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        b'{"image": "a.png", "caption": "ok"}\n{"image": "b.png", "caption": "caf\xe9"}\n'
    )
    with pytest.raises(DataError) as info:
        read_jsonl(path, "caption")
    assert f"{path}:2" in str(info.value)
