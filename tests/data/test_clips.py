"""Video clips: frame sampling, the temporal embedding, clip data (frame lists, folders and video
files) with their errors, the synthetic moving shapes, and the command line on clips."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import require_module
from vtfuse.cli.main import main
from vtfuse.config import FusionConfig, ModelConfig, TextConfig, VisionConfig
from vtfuse.data.bank import load_records
from vtfuse.data.clips import load_visual, sample_indices
from vtfuse.data.jsonl import DataError, ImagePathRefused
from vtfuse.data.synth import COLOURS
from vtfuse.data.synth_clips import DIRECTIONS, ClipSpec, generate_clips
from vtfuse.models.factory import create_model
from vtfuse.tasks import read_jsonl

SIZE = 16
VISION = VisionConfig(image_size=SIZE, patch_size=4, channels=(8, 8), dim=16, heads=2)
TEXT = TextConfig(vocab_size=20, dim=16, depth=2, heads=2, max_length=12)


def write_jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def shade(i: int) -> tuple[int, int, int]:
    """Frame i's colour: red rises with i, so a sampled frame tells its index."""
    return (20 + 30 * i, 60, 200)


def write_frames(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (SIZE, SIZE), shade(i)).save(folder / f"{i:02d}.png")
    return [f"{folder.name}/{i:02d}.png" for i in range(count)]


def frame_index(frame: torch.Tensor) -> int:
    """Which of `shade`'s frames a decoded (3, H, W) frame is."""
    return round((frame[0].float().mean().item() - 20) / 30)


def pair(task: str, fusion: str, frames: int, seed: int = 0):
    """The same random weights as a still-image model and as a clip model of `frames`."""
    config = ModelConfig(task, VISION, TEXT, FusionConfig(fusion, latents=4), num_answers=5)
    torch.manual_seed(seed)
    still = create_model(config).eval()
    clip_config = dataclasses.replace(config, vision=dataclasses.replace(VISION, frames=frames))
    clip = create_model(clip_config).eval()
    missing, unexpected = clip.load_state_dict(still.state_dict(), strict=False)
    assert missing == ["vision.temporal.embedding"] and not unexpected
    return still, clip


def random_images(count: int) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, SIZE, SIZE), dtype=torch.uint8)


TOKENS = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 0]])
MASK = TOKENS != 0


# -- sampling ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "length,count,expected",
    [
        (8, 4, [1, 3, 5, 7]),  # the middle of each of 4 segments of 2
        (4, 4, [0, 1, 2, 3]),
        (9, 1, [4]),  # one frame: the middle one
        (2, 4, [0, 0, 1, 1]),  # a short clip repeats its frames, in order
        (1, 3, [0, 0, 0]),  # a still image
        (10, 3, [1, 5, 8]),
    ],
)
def test_frames_are_sampled_uniformly(length, count, expected):
    assert sample_indices(length, count) == expected


def test_sampling_is_ordered_in_range_and_spread():
    for length in range(1, 40):
        for count in range(1, 12):
            indices = sample_indices(length, count)
            assert len(indices) == count and indices[0] >= 0 and indices[-1] < length
            assert indices == sorted(indices)
            if length >= count:  # no frame twice, and none of the clip's segments left out
                assert len(set(indices)) == count
    with pytest.raises(ValueError, match="cannot sample"):
        sample_indices(0, 4)


# -- the model -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fusion", ["cross_attention", "resampler"])
def test_a_clip_of_one_repeated_frame_reads_as_the_still_image(fusion):
    """With the temporal embedding at its initial zero, a clip model answers a clip of one frame
    repeated (or the still image itself) as the still-image model with the same weights."""
    still, clip = pair("vqa", fusion, frames=4)
    images = random_images(2)
    repeated = images[:, None].expand(-1, 4, -1, -1, -1)
    with torch.no_grad():
        expected, _ = still(images, TOKENS, MASK)
        from_clip, _ = clip(repeated, TOKENS, MASK)
        from_still, _ = clip(images, TOKENS, MASK)  # a still image: a clip of copies of itself
    torch.testing.assert_close(from_clip, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(from_still, expected, atol=1e-6, rtol=0)
    assert clip.encode_image(repeated).shape == (2, 4 * 16, 16)  # 4 frames of 4 × 4 tokens


def test_a_captioner_reads_a_repeated_frame_as_the_still_image():
    still, clip = pair("caption", "cross_attention", frames=3)
    images = random_images(2)
    with torch.no_grad():
        expected, _ = still(images, TOKENS)
        got, _ = clip(images[:, None].expand(-1, 3, -1, -1, -1), TOKENS)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_the_temporal_embedding_makes_frame_order_matter():
    _, clip = pair("vqa", "cross_attention", frames=4, seed=1)
    frames = random_images(4)[None]  # one clip of 4 different frames
    backwards = frames.flip(1)

    def read(clip_frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame tokens (1, 4, N, dim) in time order of `frames`, and the answer logits."""
        with torch.no_grad():
            tokens = clip.encode_image(clip_frames).unflatten(1, (4, -1))
            answer, _ = clip(clip_frames, TOKENS[:1], MASK[:1])
        return tokens, answer

    (tokens, answer), (tokens_back, answer_back) = read(frames), read(backwards)
    # at zero each frame's tokens are the same in either order: one bag, one answer
    torch.testing.assert_close(tokens_back.flip(1), tokens, atol=1e-6, rtol=0)
    torch.testing.assert_close(answer_back, answer, atol=1e-5, rtol=0)
    with torch.no_grad():
        clip.vision.temporal.embedding.normal_()
    (tokens, answer), (tokens_back, answer_back) = read(frames), read(backwards)
    assert (tokens_back.flip(1) - tokens).abs().max() > 0.1
    assert (answer_back - answer).abs().max() > 1e-3


def test_shapes_that_do_not_fit_are_refused():
    still, clip = pair("vqa", "cross_attention", frames=4)
    with pytest.raises(ValueError, match=r"a clip model of 4 frames takes clips \(B, 4, 3, H, W\)"):
        clip.encode_image(torch.zeros(1, 3, 3, SIZE, SIZE, dtype=torch.uint8))
    with pytest.raises(ValueError, match="a still-image model takes images"):
        still.encode_image(torch.zeros(1, 4, 3, SIZE, SIZE, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"vision\.frames must be at least 1"):
        create_model(ModelConfig("vqa", dataclasses.replace(VISION, frames=0), TEXT, num_answers=2))


def test_a_still_model_config_has_no_temporal_weights_and_old_configs_load():
    still, clip = pair("vqa", "cross_attention", frames=2)
    assert not any("temporal" in name for name in still.state_dict())
    assert "vision.temporal.embedding" in clip.trainable_state_dict()
    assert VisionConfig().frames == 1  # a config.json written before clips still loads as stills


def test_a_pretrained_lm_captioner_reads_clips_and_interleaved_clips(gpt2_folder):
    """An LM captioner of 2 frames: one clip per row, or (few-shot) M clips per row, each word
    seeing only its latest clip's F·N tokens."""
    from vtfuse.config import LMConfig

    image_token = 3
    vision = VisionConfig(image_size=24, channels=(8, 8, 16), dim=16, depth=0, heads=2, frames=2)
    lm = LMConfig(name=str(gpt2_folder), image_token_id=image_token)
    torch.manual_seed(1)
    model = create_model(
        ModelConfig(vision=vision, fusion=FusionConfig("gated_cross_attention"), lm=lm)
    ).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gate"):
                parameter.fill_(0.5)
    per_clip = 2 * model.grid_size[0] * model.grid_size[1]
    assert model.tokens_per_image == per_clip
    clips = torch.randint(0, 256, (2, 2, 2, 3, 24, 24), dtype=torch.uint8)  # (B, M, F, 3, H, W)
    tokens = torch.tensor(
        [[5, image_token, 6, 7, image_token, 8], [image_token, 5, 6, image_token, 7, 8]]
    )
    with torch.no_grad():
        one, _ = model(clips[:, 0], tokens)  # one clip per row
        logits, weights = model(clips, tokens, need_weights=True)
    assert one.shape == logits.shape == (2, 6, 64)
    latest = (tokens == image_token).cumsum(1) - 1
    on_clip = weights[0].mean(1).unflatten(-1, (2, per_clip)).sum(-1)  # (B, T, M)
    for row in range(2):
        for t in range(6):
            if latest[row, t] >= 0:
                assert on_clip[row, t, latest[row, t]] == pytest.approx(1.0, abs=1e-5)


# -- clip data -----------------------------------------------------------------------------------
def test_frame_lists_are_sampled_into_the_bank(tmp_path):
    frames = write_frames(tmp_path / "clip", 8)
    write_frames(tmp_path / "short", 2)
    Image.new("RGB", (SIZE, SIZE), shade(5)).save(tmp_path / "still.png")
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"frames": frames, "question": "which way?", "answer": "left"},
            {"frames": ["short/00.png", "short/01.png"], "question": "q?", "answer": "up"},
            {"image": "still.png", "question": "q?", "answer": "up"},
            {"frames": list(frames), "question": "again?", "answer": "left"},
        ],
    )
    data = load_records(read_jsonl(path, "vqa"), SIZE, progress=False, frames=4)
    assert len(data.bank.tensors) == 3  # the same frames, decoded once
    assert data.image_ids == [0, 1, 2, 0]
    clip, short, still = data.bank.tensors
    assert clip.shape == (4, 3, SIZE, SIZE) and clip.dtype == torch.uint8
    assert [frame_index(f) for f in clip] == [1, 3, 5, 7]
    assert [frame_index(f) for f in short] == [0, 0, 1, 1]
    assert [frame_index(f) for f in still] == [5, 5, 5, 5]
    single = load_records(read_jsonl(path, "vqa"), SIZE, progress=False)  # a still-image model
    assert single.bank.tensors[0].shape == (3, SIZE, SIZE)
    assert frame_index(single.bank.tensors[0]) == 4  # a clip's middle frame


def test_load_visual_takes_folders_lists_and_stills(tmp_path):
    write_frames(tmp_path / "clip", 6)
    from_folder = load_visual(tmp_path / "clip", SIZE, 3)
    assert [frame_index(f) for f in from_folder] == [1, 3, 5]
    listed = [tmp_path / "clip" / f"{i:02d}.png" for i in range(6)]
    assert torch.equal(load_visual(listed, SIZE, 3), from_folder)
    assert load_visual(listed[2], SIZE, 3).shape == (3, 3, SIZE, SIZE)
    assert load_visual(listed[2], SIZE).shape == (3, SIZE, SIZE)


@pytest.mark.parametrize(
    "fields,problem",
    [
        ({"question": "q?", "answer": "a"}, "missing field 'image' (or 'video', or 'frames')"),
        (
            {"image": "a.png", "frames": ["a.png"], "question": "q?", "answer": "a"},
            "give one of 'image', 'video' and 'frames', not image and frames",
        ),
        (
            {"frames": "a.png", "question": "q?", "answer": "a"},
            "field 'frames' must be a non-empty",
        ),
        ({"frames": [], "question": "q?", "answer": "a"}, "field 'frames' must be a non-empty"),
        ({"video": ["a.mp4"], "question": "q?", "answer": "a"}, "'video' must be a path string"),
    ],
)
def test_bad_clip_fields_name_file_and_line(tmp_path, fields, problem):
    path = write_jsonl(tmp_path / "data.jsonl", [{"image": "a.png", "question": "q?"}, fields])
    with pytest.raises(DataError) as info:
        read_jsonl(path, "vqa", labelled=False)
    assert f"{path}:2: {problem}" in str(info.value)


def test_a_missing_frame_or_unreadable_video_names_file_line_and_file(tmp_path):
    frames = write_frames(tmp_path / "clip", 4)
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is no video" * 4)
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"frames": frames, "caption": "fine."},
            {"frames": [*frames[:2], "clip/99.png", frames[3]], "caption": "a frame is missing."},
            {"video": "broken.mp4", "caption": "unreadable."},
            {"video": "absent.mp4", "caption": "not there."},
        ],
    )
    records = read_jsonl(path, "caption")
    with pytest.raises(DataError) as info:
        load_records(records, SIZE, progress=False, frames=4)
    assert f"{path}:2: " in str(info.value) and "clip/99.png" in str(info.value)
    assert "--skip-bad" in str(info.value)
    with pytest.raises(DataError) as info:
        load_records(records[2:3], SIZE, progress=False, frames=4)
    assert f"{path}:3: " in str(info.value) and "broken.mp4" in str(info.value)
    data = load_records(records, SIZE, skip_bad=True, progress=False, frames=4)
    assert [r.line for r in data.records] == [1]
    assert len(data.skipped) == 3
    assert f"{path}:4: " in data.skipped[2] and "absent.mp4" in data.skipped[2]


def test_frame_and_video_paths_must_stay_in_the_data_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    path = write_jsonl(
        data / "data.jsonl",
        [
            {"frames": ["../outside/00.png"], "caption": "x."},
            {"video": "/etc/passwd.mp4", "caption": "y."},
        ],
    )
    records = read_jsonl(path, "caption")
    with pytest.raises(ImagePathRefused, match=r":1: frame path '../outside/00.png' leaves"):
        records[0].visual  # noqa: B018
    with pytest.raises(ImagePathRefused, match=r":2: video path '/etc/passwd.mp4' is absolute"):
        records[1].visual  # noqa: B018
    with pytest.raises(DataError, match=":1: a video clip, where a still image is needed"):
        records[0].image_path  # noqa: B018
    write_frames(tmp_path / "outside", 1)
    allowed = read_jsonl(path, "caption", roots=[tmp_path / "outside"])[0].visual
    assert allowed.kind == "frames" and allowed.paths[0].name == "00.png"


# -- video files (PyAV) --------------------------------------------------------------------------
def test_a_video_file_is_decoded_and_sampled(tmp_path):
    require_module("av")
    from vtfuse.data.clips import load_video, write_video

    frames = [Image.new("RGB", (32, 32), shade(i)) for i in range(8)]
    path = write_video(tmp_path / "tiny.mp4", frames)
    clip, original = load_video(path, SIZE, 4)
    assert clip.shape == (4, 3, SIZE, SIZE) and clip.dtype == torch.uint8
    assert original == (32, 32)
    assert [frame_index(f) for f in clip] == [1, 3, 5, 7]
    assert frame_index(load_visual(path, SIZE, 1)) == 4
    line = write_jsonl(tmp_path / "d.jsonl", [{"video": "tiny.mp4", "caption": "c."}])
    bank = load_records(read_jsonl(line, "caption"), SIZE, progress=False, frames=8).bank
    assert [frame_index(f) for f in bank.tensors[0]] == list(range(8))


# -- synthetic clips -----------------------------------------------------------------------------
def _centre(image: Image.Image, colour: str) -> tuple[float, float]:
    pixels = torch.from_numpy(np.array(image)).int()
    near = (pixels - torch.tensor(COLOURS[colour])).abs().sum(-1) < 30
    ys, xs = near.nonzero(as_tuple=True)
    return xs.float().mean().item(), ys.float().mean().item()


def test_synthetic_clips_move_the_way_their_answers_say(tmp_path):
    spec = ClipSpec(clips=12, seed=3, size=48, length=6)
    counts = generate_clips(tmp_path, spec, progress=False)
    assert sum(v for k, v in counts.items() if k.startswith("caption")) == 12
    lines = [json.loads(x) for x in (tmp_path / "vqa_train.jsonl").read_text().splitlines()]
    assert {line["type"] for line in lines} <= {"direction", "moving"}
    directions = [line for line in lines if line["type"] == "direction"]
    assert directions and all(line["answer"] in DIRECTIONS for line in directions)
    for line in directions:
        assert len(line["frames"]) == 6
        colour = line["question"].split()[4]  # "Which way does the red circle move?"
        first = _centre(Image.open(tmp_path / line["frames"][0]), colour)
        last = _centre(Image.open(tmp_path / line["frames"][-1]), colour)
        dx, dy = DIRECTIONS[line["answer"]]
        assert (last[0] - first[0]) * dx + (last[1] - first[1]) * dy > 3  # pixels, that way
    captions = [json.loads(x) for x in (tmp_path / "caption_train.jsonl").read_text().splitlines()]
    assert all(" moves " in c["captions"][0] for c in captions)
    again = tmp_path / "again"
    generate_clips(again, spec, progress=False)
    assert (again / "vqa_test.jsonl").read_text() == (tmp_path / "vqa_test.jsonl").read_text()


# -- the command line ----------------------------------------------------------------------------
TINY = {
    "model": {
        "vision": {"image_size": 24, "patch_size": 8, "channels": [8, 8, 16], "dim": 32,
                   "heads": 2, "frames": 3},
        "text": {"dim": 32, "depth": 1, "heads": 2, "max_length": 24},
    },
    "train": {"epochs": 1, "batch_size": 16, "lr": 0.003},
}  # fmt: skip


def test_train_ask_and_eval_on_clips_from_the_command_line(tmp_path, capsys):
    data = tmp_path / "data"
    synth = ["synth", "--out", str(data), "--clips", "20", "--size", "24", "--clip-length", "4"]
    assert main(synth) == 0
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    run = tmp_path / "run"
    train = ["train", "--task", "vqa", "--train", str(data / "vqa_train.jsonl"), "--val",
             str(data / "vqa_val.jsonl"), "--out", str(run), "--config",
             str(tmp_path / "tiny.json"), "--frames", "2", "--no-progress"]  # fmt: skip
    assert main(train) == 0
    config = json.loads((run / "best" / "config.json").read_text())
    assert config["model"]["vision"]["frames"] == 2  # the flag over the config file
    capsys.readouterr()
    clip = data / "clips" / "000000"
    question = "which way does the red circle move?"
    assert main(["ask", str(run), str(clip), question, "--top-k", "2"]) == 0
    answers = capsys.readouterr().out.strip().splitlines()
    assert len(answers) == 2 and all("%" in a for a in answers)
    still = clip / "00.png"  # a still image: a clip of one repeated frame
    assert main(["ask", str(run), str(still), question]) == 0
    metrics = tmp_path / "metrics.json"
    test = str(data / "vqa_test.jsonl")
    assert main(["eval", str(run), "--data", test, "--metrics", str(metrics), "--no-progress"]) == 0
    scored = json.loads(metrics.read_text())
    assert scored["examples"] == len(Path(test).read_text().splitlines())
    assert set(scored["accuracy_by_type"]) <= {"direction", "moving"}
    assert main(["eval", str(run), "--data", test, "--blind", "--no-progress"]) == 0
    picture = tmp_path / "attention.png"
    attention = ["attention", str(run), str(clip), "--question", question, "--out", str(picture)]
    assert main(attention) == 0
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_caption_and_predict_on_video_files(tmp_path, capsys):
    require_module("av")
    data = tmp_path / "data"
    synth = ["synth", "--out", str(data), "--clips", "10", "--size", "24", "--clip-length", "4",
             "--video"]  # fmt: skip
    assert main(synth) == 0
    assert (data / "clips" / "000000.mp4").is_file()
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    for task in ("caption", "classify"):
        train = ["train", "--task", task, "--train", str(data / f"{task}_train.jsonl"),
                 "--out", str(tmp_path / task), "--config", str(tmp_path / "tiny.json"),
                 "--no-progress"]  # fmt: skip
        assert main(train) == 0
    capsys.readouterr()
    video = str(data / "clips" / "000000.mp4")
    assert main(["caption", str(tmp_path / "caption"), video]) == 0
    assert capsys.readouterr().out.startswith(video + "\t")
    predict = ["predict", str(tmp_path / "classify"), video, "--text", "the red circle moves up."]
    assert main(predict) == 0
    assert "%" in capsys.readouterr().out


def test_synth_refuses_mixed_requests(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--clips", "2", "--images", "2"]) == 2
    assert "give one" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path), "--images", "2", "--video"]) == 2
    assert "--video writes clips" in capsys.readouterr().err
