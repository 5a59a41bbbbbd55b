"""Bad input loses nothing: generated JSONL lines and image files of every broken kind either
load as documented or raise a clear error naming the file and line — never anything else.

Image paths that leave the data folder (absolute, through `..` or a symbolic link) are refused
with file:line unless their folder is allowed.

Hypothesis generates the cases (well over 1000 in all, counted by `CASES`)."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vtfuse.data.bank import load_records
from vtfuse.data.images import ImageLoadError, image_to_uint8, load_image
from vtfuse.data.jsonl import DataError, ImagePathRefused
from vtfuse.tasks import read_jsonl

CASES: Counter[str] = Counter()  # generated cases by test (and parameter), see the last test
TASKS = ["caption", "vqa", "retrieval"]
FAST = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
field_names = st.sampled_from(
    ["image", "caption", "captions", "question", "answer", "answers", "type", "boxes", "extra"]
)
records = st.dictionaries(field_names, json_values | st.just("a.png") | st.just(""), max_size=6)
raw_lines = (
    st.binary(max_size=60) | records.map(lambda r: json.dumps(r).encode()) | st.just(b"\xff\xfe{")
)


@pytest.mark.parametrize("task", TASKS)
@FAST
@given(lines=st.lists(raw_lines, min_size=1, max_size=5))
def test_any_jsonl_loads_or_names_file_and_line(tmp_path_factory, task, lines):
    CASES[f"jsonl/{task}"] += 1
    path = tmp_path_factory.mktemp("jsonl") / "data.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n")
    try:
        loaded = read_jsonl(path, task)
    except DataError as error:
        message = str(error)
        assert message.startswith(str(path)), message
        assert message == f"{path}: no examples" or message[len(str(path)) + 1].isdigit()
        return
    for record in loaded:  # what loads is what the format promises
        assert isinstance(record.fields["image"], str)
        if task in ("caption", "retrieval"):
            assert all(isinstance(c, str) and c.strip() for c in record.captions)
        else:
            assert isinstance(record.fields["question"], str) and record.fields["question"].strip()


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _images() -> dict[str, bytes]:
    """One of each kind Pillow can write that a user may bring."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8))
    sixteen = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    return {
        "png": _encode(rgb, "PNG"),
        "jpeg": _encode(rgb, "JPEG"),
        "gif-palette": _encode(rgb.convert("P"), "GIF"),
        "grey": _encode(rgb.convert("L"), "PNG"),
        "rgba": _encode(rgb.convert("RGBA"), "PNG"),
        "cmyk": _encode(rgb.convert("CMYK"), "JPEG"),
        "16-bit": _encode(sixteen, "PNG"),
        "webp": _encode(rgb, "WEBP"),
        "bmp": _encode(rgb, "BMP"),
        "tiny": _encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        "exif-rotated": _encode(rgb, "JPEG", exif=exif),
    }


IMAGES = _images()


def test_every_kind_of_image_becomes_rgb():
    for kind, data in IMAGES.items():
        image = load_image(io.BytesIO(data))
        assert image.mode == "RGB", kind
        assert image_to_uint8(image, 24).shape == (3, 24, 24)
    assert load_image(io.BytesIO(IMAGES["exif-rotated"])).size == (12, 16)  # turned upright
    bright = np.asarray(load_image(io.BytesIO(IMAGES["16-bit"])))
    assert 150 < bright.mean() < 160  # 40000 / 65535 of white, not clipped to 255


@FAST
@given(
    kind=st.sampled_from(sorted(IMAGES)),
    cut=st.integers(min_value=0, max_value=400),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    extension=st.sampled_from([".png", ".jpg", ".gif", ".txt", ""]),
)
def test_truncated_or_corrupted_images_load_or_fail_clearly(
    tmp_path_factory, kind, cut, flips, extension
):
    CASES["images"] += 1
    data = bytearray(IMAGES[kind][: max(0, len(IMAGES[kind]) - cut)])
    for position, value in flips:
        if data:
            data[position % len(data)] = value
    path = tmp_path_factory.mktemp("images") / f"broken{extension}"
    path.write_bytes(bytes(data))
    try:
        image = load_image(path)
    except ImageLoadError as error:
        assert str(path) in str(error)
        return
    assert image.mode == "RGB" and min(image.size) >= 1


def test_a_decompression_bomb_is_refused(tmp_path):
    """A PNG header claiming 30000 × 30000 pixels: refused before any pixel is decoded."""
    path = tmp_path / "bomb.png"
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + b"\x00\x00\x00\x00IEND\xaeB`\x82")
    with pytest.raises(ImageLoadError, match=r"bomb.png .*(30000×30000|900000000) pixels"):
        load_image(path)


def test_bad_images_in_a_dataset_are_named_or_skipped_and_counted(tmp_path):
    names = []
    for kind, data in [
        *IMAGES.items(),
        ("zero-byte", b""),
        ("text", b"hello"),
        ("cut", IMAGES["png"][:30]),
    ]:
        (tmp_path / f"{kind}.img").write_bytes(data)
        names.append(f"{kind}.img")
    lines = [json.dumps({"image": n, "caption": "a thing"}) for n in [*names, "missing.png"]]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    records = read_jsonl(tmp_path / "data.jsonl", "caption")
    with pytest.raises(DataError, match=r"data.jsonl:12: .*zero-byte.img"):
        load_records(records, 24, progress=False)
    loaded = load_records(records, 24, skip_bad=True, progress=False)
    assert len(loaded.records) == len(IMAGES) and len(loaded.skipped) == 4
    assert all("data.jsonl:" in reason for reason in loaded.skipped)


# -- image paths outside the data folder -------------------------------------------------------
@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """tree/{outside.png, allowed/pic.png, data/{in.png, sub/in.png, link_in → sub,
    link_out → ../allowed}}: the JSONL files live in data/."""
    root = tmp_path_factory.mktemp("pathtree")
    (root / "data" / "sub").mkdir(parents=True)
    (root / "allowed").mkdir()
    for name in ("outside.png", "allowed/pic.png", "data/in.png", "data/sub/in.png"):
        (root / name).write_bytes(IMAGES["png"])
    (root / "data" / "link_in").symlink_to("sub")
    (root / "data" / "link_out").symlink_to(root / "allowed")
    return root


LINKS = {("data", "link_in"): ["data", "sub"], ("data", "link_out"): ["allowed"]}
SEGMENTS = ["..", ".", "", "data", "sub", "allowed", "link_in", "link_out", "in.png", "pic.png"]
SEGMENTS += ["nowhere", "nul\x00byte"]


def landing(written: str, parts: list[str], absolute: bool) -> list[str] | None:
    """Where a path lands, as folders under the tree (symbolic links followed as the OS does,
    '..' after a link leaving the link's target); None: outside the tree (from above it, or
    from the file system's root, the names below never lead back in)."""
    if written.startswith("/") and not absolute:  # a leading '' part: "/..." from the root
        return None
    at = [] if absolute else ["data"]
    for part in parts:
        if part == "..":
            if not at:
                return None
            at = at[:-1]
        elif part not in ("", "."):
            at = LINKS.get((*at, part), [*at, part])
    return at


@pytest.mark.parametrize("allow", [False, True], ids=["no-root", "image-root"])
@FAST
@given(absolute=st.booleans(), parts=st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6))
def test_image_paths_outside_the_data_folder_are_refused_unless_allowed(
    tree, allow, absolute, parts
):
    CASES[f"paths/{allow}"] += 1
    written = (f"{tree}/" if absolute else "") + "/".join(parts)
    jsonl = tree / "data" / "data.jsonl"
    jsonl.write_text(json.dumps({"image": written, "caption": "a thing"}) + "\n")
    (record,) = read_jsonl(jsonl, "caption", roots=[tree / "allowed"] if allow else [])
    at = landing(written, parts, absolute)
    relative = not written.startswith("/")
    inside = (
        at is not None
        and "\x00" not in written
        and ((at[:1] == ["data"] and relative) or (allow and at[:1] == ["allowed"]))
    )
    try:
        path = record.image_path
    except ImagePathRefused as error:
        assert not inside, (written, str(error))
        assert str(error).startswith(f"{jsonl}:1: image path {written!r}"), str(error)
        return
    assert inside, written
    assert path.resolve().is_relative_to(tree / ("allowed" if at[:1] == ["allowed"] else "data"))


def test_refused_image_paths_are_skipped_and_counted_with_the_reason(tree):
    jsonl = tree / "data" / "mixed.jsonl"
    names = ["in.png", "../outside.png", str(tree / "allowed" / "pic.png"), "link_out/pic.png"]
    jsonl.write_text("".join(json.dumps({"image": n, "caption": "x"}) + "\n" for n in names))
    records = read_jsonl(jsonl, "caption")
    with pytest.raises(ImagePathRefused, match=r"mixed\.jsonl:2: image path '\.\./outside\.png'"):
        load_records(records, 8, progress=False)
    loaded = load_records(records, 8, skip_bad=True, progress=False)
    assert [r.line for r in loaded.records] == [1]
    reasons = ["through '..'", "is absolute", "through a symbolic link"]
    for line, (skipped, reason) in enumerate(zip(loaded.skipped, reasons, strict=True), 2):
        assert skipped.startswith(f"{jsonl}:{line}: image path ") and reason in skipped
        assert "--image-root" in skipped
    allowed = read_jsonl(jsonl, "caption", roots=[tree / "allowed"])
    loaded = load_records(allowed, 8, skip_bad=True, progress=False)
    assert [r.line for r in loaded.records] == [1, 3, 4] and len(loaded.skipped) == 1
    with pytest.raises(DataError, match=r"--image-root .*nowhere: no such folder"):
        read_jsonl(jsonl, "caption", roots=[tree / "nowhere"])


def generated_tests(tmp_path_factory, tree) -> dict[str, Callable[[], None]]:
    """Each generated test above, with its parameters, by its key in CASES."""
    jsonl = test_any_jsonl_loads_or_names_file_and_line
    images = test_truncated_or_corrupted_images_load_or_fail_clearly
    paths = test_image_paths_outside_the_data_folder_are_refused_unless_allowed
    runs = {f"jsonl/{task}": partial(jsonl, tmp_path_factory, task) for task in TASKS}
    runs["images"] = partial(images, tmp_path_factory)
    runs.update({f"paths/{allow}": partial(paths, tree, allow) for allow in (False, True)})
    return runs


def test_the_suite_ran_over_a_thousand_cases(tmp_path_factory, tree):
    """Runs last in this file: the generated cases above, counted. Those that did not run
    before it (this test run alone, or picked with -k) are generated here, so the count does
    not depend on which tests were selected."""
    for key, run in generated_tests(tmp_path_factory, tree).items():
        if CASES[key] == 0:
            run()
    print(f"{sum(CASES.values())} generated cases: {dict(CASES)}")
    assert sum(CASES.values()) >= 1000, CASES
