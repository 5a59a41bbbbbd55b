"""`vtfuse synth` and `vtfuse data`: write datasets (generated, imported, packed into shards)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vtfuse.cli.commands import (
    command,
    given_roots,
    image_root_arg,
)
from vtfuse.tasks import CAPTION, task_names


# -- synth ------------------------------------------------------------------------------------
def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder to write images and JSONL splits into")
    p.add_argument(
        "--style",
        choices=("scenes", "sort-of-clevr"),
        default="scenes",
        help="scenes: vtfuse's own (3 × 3 layout, all four tasks); sort-of-clevr: the paper's "
        "specification (Santoro et al. 2017: 75 px, 6 objects anywhere, 10 non-relational and "
        "10 relational questions an image, captions), written by a separate generator",
    )
    p.add_argument(
        "--images",
        type=int,
        help="number of scenes (default 3000; sort-of-clevr: training images, default 9800)",
    )
    p.add_argument(
        "--eval-images",
        type=int,
        default=200,
        help="--style sort-of-clevr: images in each of the validation and test splits",
    )
    p.add_argument(
        "--clips",
        type=int,
        help="write N video clips of moving shapes instead of still scenes: motion questions "
        "('which way does the red circle move?'), captions, statements",
    )
    p.add_argument("--clip-length", type=int, default=8, help="with --clips: frames per clip")
    p.add_argument(
        "--video",
        action="store_true",
        help="with --clips: one .mp4 per clip instead of a folder of PNG frames (pip install "
        '"vtfuse[video]")',
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same data)")
    p.add_argument("--size", type=int, default=72, help="image side in pixels")
    p.add_argument(
        "--min-objects", type=int, help="fewest objects in a scene (default 3; a clip: 2)"
    )
    p.add_argument("--max-objects", type=int, help="most objects in a scene (default 5; a clip: 3)")
    p.add_argument(
        "--shapes", default="square,circle", help="comma-separated: square,circle,triangle"
    )
    p.add_argument(
        "--questions-per-kind",
        type=int,
        default=5,
        help="questions per image of each kind (non-relational, relational)",
    )


@command("synth", "generate the built-in synthetic scenes (or clips), captions and questions")(
    _synth_args
)
def run_synth(args: argparse.Namespace) -> int:
    from vtfuse.data.synth import SynthSpec, generate
    from vtfuse.data.synth_clips import ClipSpec, generate_clips

    if args.style == "sort-of-clevr":
        return _synth_sort_of_clevr(args)
    shapes = tuple(s.strip() for s in args.shapes.split(",") if s.strip())
    given = (("min_objects", args.min_objects), ("max_objects", args.max_objects))
    objects = {name: value for name, value in given if value is not None}
    if args.clips is not None:
        if args.images is not None:
            raise ValueError("--images (still scenes) and --clips (video clips): give one")
        clip_spec = ClipSpec(
            args.clips,
            args.seed,
            args.size,
            args.clip_length,
            shapes=shapes,
            video=args.video,
            **objects,
        )
        counts = generate_clips(args.out, clip_spec)
    else:
        if args.video:
            raise ValueError("--video writes clips: give --clips N")
        spec = SynthSpec(
            images=3000 if args.images is None else args.images,
            seed=args.seed,
            size=args.size,
            shapes=shapes,
            questions_per_kind=args.questions_per_kind,
            **objects,
        )
        counts = generate(args.out, spec)
    for name, count in counts.items():
        print(f"  {args.out}/{name}.jsonl  {count} examples")
    return 0


def _synth_sort_of_clevr(args: argparse.Namespace) -> int:
    from vtfuse.data.sort_of_clevr import SortOfClevrSpec, generate

    if args.clips is not None:
        raise ValueError("--style sort-of-clevr writes still images: leave out --clips")
    train = 9800 if args.images is None else args.images
    spec = SortOfClevrSpec(train=train, val=args.eval_images, test=args.eval_images, seed=args.seed)
    for name, count in generate(args.out, spec).items():
        print(f"  {args.out}/{name}.jsonl  {count} examples")
    return 0


# -- data -------------------------------------------------------------------------------------
def _data_args(p: argparse.ArgumentParser) -> None:
    from vtfuse.data.importers import IMPORTERS

    actions = p.add_subparsers(dest="data_action", required=True, metavar="ACTION")
    imp = actions.add_parser(
        "import", help="a dataset in its official format → vtfuse JSONL, one file per split"
    )
    imp.add_argument("format", choices=IMPORTERS.names(), help="the source's format")
    imp.add_argument("--out", required=True, help="folder for <split>.jsonl (or data.jsonl)")
    imp.add_argument(
        "--annotations",
        nargs="+",
        type=Path,
        default=[],
        help="caption or answer annotations (Karpathy split file, captions_*.json, VQAv2 "
        "annotations, the CSV/TSV file, or the hf dataset name or saved folder)",
    )
    imp.add_argument("--questions", type=Path, help="VQAv2 questions file")
    imp.add_argument("--images", type=Path, help="image root (COCO: 2014 or 2017 file names)")
    imp.add_argument("--image-column", default="image", help="csv/tsv/hf: the image column")
    imp.add_argument("--text-column", default=CAPTION.reads, help="csv/tsv/hf: the text column")
    imp.add_argument("--split", default="", help="hf: import only this split")
    imp.add_argument("--copy-images", action="store_true", help="copy images into OUT/images")
    imp.add_argument("--strict", action="store_true", help="stop at the first malformed record")
    shard = actions.add_parser(
        "shard", help="JSONL (a file, or every *.jsonl in a folder) → WebDataset tar shards"
    )
    shard.add_argument("source", type=Path, help="a JSONL file, or a folder of them")
    shard.add_argument("--task", choices=task_names(), required=True)
    shard.add_argument("--out", type=Path, required=True, help="shard folder (one per file)")
    shard.add_argument("--shard-size", type=int, default=1000, help="records per shard")
    image_root_arg(shard)


@command("data", "import datasets in their official formats; pack JSONL into shards")(_data_args)
def run_data(args: argparse.Namespace) -> int:
    return {"import": _run_import, "shard": _run_shard}[args.data_action](args)


def _run_shard(args: argparse.Namespace) -> int:
    from vtfuse.data.shards import write_shards

    if args.source.is_dir():
        jobs = [(f, args.out / f.stem) for f in sorted(args.source.glob("*.jsonl"))]
        if not jobs:
            raise FileNotFoundError(f"no *.jsonl files in {args.source}")
    else:
        jobs = [(args.source, args.out)]
    for source, out in jobs:
        index = write_shards(source, args.task, out, args.shard_size, given_roots(args))
        print(f"  {out}  {index['records']} records in {len(index['shards'])} shard(s)")
    return 0


def _run_import(args: argparse.Namespace) -> int:
    from vtfuse.data.importers import ImportOptions, import_dataset, outside_image_root

    options = ImportOptions(
        annotations=args.annotations,
        questions=args.questions,
        images=args.images,
        image_column=args.image_column,
        text_column=args.text_column,
        split=args.split,
        strict=args.strict,
        out=Path(args.out),
    )
    written, skipped = import_dataset(args.format, options, args.copy_images)
    for path, count in written:
        print(f"  {path}  {count} examples")
    root = outside_image_root([path for path, _ in written])
    if root is not None:
        print(
            f"the images lie outside {args.out}, under {root}: give --image-root {root} to "
            "vtfuse train, eval and data shard (or import with --copy-images)"
        )
    print(f"skipped {len(skipped)} record(s)" + (":" if skipped else ""))
    for reason in skipped[:20]:
        print(f"  {reason}")
    if len(skipped) > 20:
        print(f"  ... and {len(skipped) - 20} more")
    return 0
