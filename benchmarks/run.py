"""vtfuse against transformers' VisionEncoderDecoderModel (ViT + GPT-2 with cross-attention) on
the same job, at the same model size: caption generation, beam search, a training step, memory.

    python benchmarks/run.py                 # both sizes (small, base), 7 repeats
    python benchmarks/run.py --quick         # small size, 3 repeats: under 2 minutes
    python benchmarks/run.py --json R.json   # also write the small size's ratios

Both models are built by `matched.py` with random weights (nothing downloaded) and timed in this
process, alternating run by run after a warm-up; each figure is the median over the repeats.
Generation produces exactly 24 new tokens (no end token), so both do the same work. Peak memory
is measured in a fresh process per model and workload (peak resident set above the resident set
before the workload on CPU; `max_memory_allocated` on CUDA). Achieved FLOP/s are the work counted
by `torch.utils.flop_counter` over the median time, as a share of the matmul peak measured here.
Ratios are vtfuse over transformers: > 1 is faster for speed; < 1 is smaller for memory.

Inference is also timed on the faster paths (`PATHS`, on the CPU): each model with its linear
layers dynamically quantised to int8 (and vtfuse's in bf16, `--weights bf16`); each model
compiled — vtfuse's captioner ahead of time by AOTInductor (`vtfuse export --compiled`,
`--runtime compiled`), transformers' decoder by
`torch.compile` over its static cache (`cache_implementation="static"`, its own recipe for a
compiled `generate`); and vtfuse's captioner exported to ONNX Runtime (`vtfuse export --onnx`,
fp32 and int8 step graphs) decoding through the same greedy and beam loops (`--runtime onnx`).
Compiling is timed apart (`compile_seconds`: the first call's cost, paid once). Each row names
vtfuse's fastest path, its speed over transformers eager and over transformers' fastest path.
`--json` writes, per workload, vtfuse's fastest path ÷ transformers eager (`generate_b1`, ...),
`best_path`, the eager ratios (`eager`), `vs_best_peer_generate_b1` and `peak_memory`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from matched import SIZES, Size, hf_captioner, parameters, vtfuse_captioner

from vtfuse.config import TrainConfig
from vtfuse.generation import beam_search, greedy
from vtfuse.generation.compiled import CompiledDecoder, export_compiled
from vtfuse.generation.onnx import OnnxDecoder, export_onnx
from vtfuse.quantisation import convert_weights, quantise_torch_linears
from vtfuse.training.optim import make_optimizer

MODELS = {"vtfuse": vtfuse_captioner, "transformers": hf_captioner}
# Ways to run inference, path → (model, weights, runtime): each model eager in fp32, vtfuse's
# with bf16 linear layers (`--weights bf16`), each with its linear layers dynamically quantised
# to int8 (vtfuse `--weights int8`; transformers
# through the same torch quantiser, which converts its nn.Linear layers — the ViT's and the
# output layer — but not GPT-2's Conv1D projections); vtfuse's exported ONNX graphs on ONNX
# Runtime (`--runtime onnx`, fp32 and int8 steps); each compiled (vtfuse: AOTInductor packages,
# `--runtime compiled`; transformers: torch.compile of its decoder over a static cache). CPU only.
PATHS = {
    "vtfuse": ("vtfuse", "fp32", "torch"),
    "vtfuse int8": ("vtfuse", "int8", "torch"),
    "vtfuse bf16": ("vtfuse", "bf16", "torch"),
    "vtfuse compiled": ("vtfuse", "fp32", "compiled"),
    "vtfuse onnx": ("vtfuse", "fp32", "onnx"),
    "vtfuse onnx int8": ("vtfuse", "int8", "onnx"),
    "transformers": ("transformers", "fp32", "torch"),
    "transformers int8": ("transformers", "int8", "torch"),
    "transformers compiled": ("transformers", "fp32", "compiled"),
}
COMPILE_SECONDS: dict[str, float] = {}  # "path, size [workload]" → its first call's seconds


@dataclass(frozen=True)
class Workload:
    name: str
    batch: int
    beam: int = 1
    train: bool = False
    bf16: bool = False

    @property
    def unit(self) -> str:
        return "samples/s" if self.train else "ms/image"


WORKLOADS = (
    Workload("generate_b1", batch=1),
    Workload("generate_b32", batch=32),
    Workload("beam_b8", batch=8, beam=4),
    Workload("train_b32", batch=32, train=True),
)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- the two ways of doing each workload --------------------------------------------------------
def inputs(size: Size, batch: int, dev: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch)
    pixels = torch.randint(
        0, 256, (batch, 3, size.image_size, size.image_size), generator=generator
    )
    tokens = torch.randint(3, size.vocab, (batch, size.new_tokens + 2), generator=generator)
    tokens[:, 0] = 1  # <bos>
    return {
        "images": pixels.to(torch.uint8).to(dev),  # vtfuse normalises uint8 images itself
        "pixel_values": (pixels.float() / 127.5 - 1).to(dev),  # transformers takes them ready
        "tokens": tokens.to(dev),
    }


def vtfuse_job(model, size: Size, work: Workload, data) -> Callable[[], object]:
    if work.train:
        optimizer = make_optimizer(model, TrainConfig(lr=1e-4))  # what `vtfuse train` uses
        batch = {"images": data["images"], "tokens": data["tokens"]}
        cast = torch.autocast(data["images"].device.type, torch.bfloat16) if work.bf16 else None

        def step():
            with cast or nullcontext():
                loss = model.training_loss(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step
    if work.beam > 1:
        return lambda: beam_search(
            model, data["images"], beam_size=work.beam, max_length=size.new_tokens, eos_id=-1
        )
    return lambda: greedy(model, data["images"], max_length=size.new_tokens, eos_id=-1)


def transformers_job(
    model, size: Size, work: Workload, data, cache: str | None = None
) -> Callable[[], object]:
    if work.train:
        # transformers' Trainer default with torch >= 2.8: "adamw_torch_fused"
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        labels = data["tokens"][:, 1:]  # the model prepends <bos> itself (shift right)

        def step():
            model(pixel_values=data["pixel_values"], labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step
    return lambda: model.generate(
        pixel_values=data["pixel_values"],
        max_new_tokens=size.new_tokens,
        num_beams=work.beam,
        do_sample=False,
        cache_implementation=cache,
    )


JOBS = {"vtfuse": vtfuse_job, "transformers": transformers_job}


def prepare(name: str, model, work: Workload) -> None:
    if name == "transformers":
        model.generation_config.eos_token_id = None  # exactly new_tokens tokens, as vtfuse
        model.generation_config.pad_token_id = 0
    model.train(work.train)


def build(
    name: str,
    size: Size,
    work: Workload,
    dev: torch.device,
    weights: str = "fp32",
    runtime: str = "torch",
):
    model = MODELS[name](size).to(dev)
    prepare(name, model, work)
    data = inputs(size, work.batch, dev)
    if runtime == "onnx":
        model = onnx_decoder(model, weights)
    elif runtime == "compiled" and name == "vtfuse":
        model = compiled_decoder(model, size, dev)
    elif runtime == "compiled":  # transformers' recipe: a static cache, the decoder compiled
        model.decoder.forward = torch.compile(model.decoder.forward)
        job = _no_grad(hf_job(model, size, work, data))
        return _first_call_timed(f"transformers compiled, {size.name} {work.name}", job)
    elif weights != "fp32":
        quantise(name, model, weights)
    job = JOBS[name](model, size, work, data)
    if work.train:
        return job
    return _no_grad(job)


def hf_job(model, size: Size, work: Workload, data) -> Callable[[], object]:
    return transformers_job(model, size, work, data, cache="static")


def _first_call_timed(key: str, job: Callable[[], object]) -> Callable[[], object]:
    """`job`, called once here: the compile it triggers is timed into COMPILE_SECONDS."""
    started = time.perf_counter()
    job()
    COMPILE_SECONDS[key] = time.perf_counter() - started
    return job


_PACKAGES: dict[str, tempfile.TemporaryDirectory] = {}  # size → its compiled packages


def compiled_decoder(model: torch.nn.Module, size: Size, dev: torch.device) -> CompiledDecoder:
    """vtfuse's captioner compiled by AOTInductor (`vtfuse export --compiled`) and loaded. One
    compile per size serves every workload: the packages take any batch, and the models are
    random weights of the same shapes, whose values do not change the time."""
    if size.name not in _PACKAGES:
        folder = _PACKAGES[size.name] = tempfile.TemporaryDirectory()
        started = time.perf_counter()
        export_compiled(model, folder.name)
        COMPILE_SECONDS[f"vtfuse compiled, {size.name}"] = time.perf_counter() - started
    return CompiledDecoder(_PACKAGES[size.name].name, dev)


def quantise(name: str, model: torch.nn.Module, weights: str) -> None:
    if name == "vtfuse":
        convert_weights(model.eval(), weights)
        return
    quantise_torch_linears(model.eval())


def onnx_decoder(model: torch.nn.Module, weights: str) -> OnnxDecoder:
    """vtfuse's captioner exported to ONNX graphs and loaded on ONNX Runtime (the sessions
    hold the graphs in memory, so the export folder can go)."""
    with tempfile.TemporaryDirectory() as folder:
        return OnnxDecoder(export_onnx(model, folder), weights)


def paths_for(work: Workload, dev: torch.device) -> dict[str, tuple[str, str, str]]:
    """The ways to time `work`: training eager fp32 only; inference also int8 and ONNX
    Runtime on the CPU."""
    if work.train or dev.type != "cpu":
        return {name: (name, "fp32", "torch") for name in MODELS}
    return PATHS


def _no_grad(job: Callable[[], object]) -> Callable[[], object]:
    def run():
        with torch.inference_mode():
            return job()

    return run


# -- measuring ----------------------------------------------------------------------------------
def timed(job: Callable[[], object]) -> float:
    synchronize()
    start = time.perf_counter()
    job()
    synchronize()
    return time.perf_counter() - start


def median_seconds(jobs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each job, the jobs alternating run by run after 2 warm-ups
    (so a change in the machine's load falls on all of them alike)."""
    for job in jobs.values():
        job(), job()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            times[name].append(timed(job))
    return {name: statistics.median(values) for name, values in times.items()}


def count_flops(job: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        job()
    return counter.get_total_flops()


def matmul_peak(dev, dtype=torch.float32, n: int = 2048, seconds: float = 1.0) -> float:
    """FLOP/s of a large square matmul on this machine: the ceiling the workloads are held to."""
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    a @ b
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        calls += 1
    synchronize()
    return 2 * n**3 * calls / (time.perf_counter() - start)


def peak_memory(name: str, size: Size, work: Workload, probes: int) -> float:
    """Bytes above the model's own footprint at the workload's peak: the median over `probes`
    fresh processes (the allocator's reuse makes a single reading vary by ~10 %)."""
    probe = [sys.executable, __file__, "--memory-probe", name, size.name, work.name]
    readings = [
        float(subprocess.run(probe, check=True, capture_output=True, text=True).stdout.split()[-1])
        for _ in range(probes)
    ]
    return statistics.median(readings)


def memory_probe(name: str, size: Size, work: Workload) -> float:
    dev = device()
    job = build(name, size, work, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        job(), job()  # the second training step holds AdamW's moments too
        return torch.cuda.max_memory_allocated() - before
    before = _resident("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to now
    job(), job()
    return _resident("VmHWM") - before


def _resident(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


# -- the report ---------------------------------------------------------------------------------
def per_unit(work: Workload, seconds: float) -> float:
    return work.batch / seconds if work.train else 1000 * seconds / work.batch


def run_size(size: Size, repeats: int, dev, peak: float, probes: int) -> dict[str, dict]:
    """Every workload on both models; memory (with `probes` > 0) for training always, for
    generation unless quick (`probes` == 1)."""
    results = {}
    for work in WORKLOADS:
        jobs = {}
        for path, (model, *how) in paths_for(work, dev).items():
            try:
                jobs[path] = build(model, size, work, dev, *how)
            except Exception as error:  # transformers' compiled generate, where it fails
                if path != "transformers compiled":
                    raise
                print(f"  {work.name}: {path} does not run: {error!r:.300}", flush=True)
        seconds = median_seconds(jobs, repeats)
        row = {"ratio": seconds["transformers"] / seconds["vtfuse"], **best(seconds)}
        for path, job in jobs.items():
            row[path] = {work.unit: per_unit(work, seconds[path])}
            if path in MODELS:  # the flop counter does not see quantised kernels
                row[path]["peak_share"] = count_flops(job) / seconds[path] / peak
            if not work.train:
                row[path]["tokens/s"] = work.batch * size.new_tokens / seconds[path]
        memory = probes > 1 or (probes == 1 and work.train)
        for name in MODELS if memory else ():
            row[name]["peak_memory_mb"] = peak_memory(name, size, work, probes) / 2**20
        if memory:
            row["memory_ratio"] = (
                row["vtfuse"]["peak_memory_mb"] / row["transformers"]["peak_memory_mb"]
            )
        results[work.name] = row
        print(_line(work, row), flush=True)
    return results


def best(seconds: dict[str, float]) -> dict[str, object]:
    """The fastest vtfuse path, its speed over transformers eager (`best_ratio`) and over the
    fastest transformers path (`vs_best_peer`)."""
    ours = min((p for p in seconds if PATHS[p][0] == "vtfuse"), key=seconds.__getitem__)
    theirs = min((p for p in seconds if PATHS[p][0] == "transformers"), key=seconds.__getitem__)
    return {
        "best_path": ours,
        "best_ratio": seconds["transformers"] / seconds[ours],
        "best_peer": theirs,
        "vs_best_peer": seconds[theirs] / seconds[ours],
    }


def bf16_training(size: Size, repeats: int, dev) -> float:
    """vtfuse's training step under bf16 autocast over its own fp32 step (samples/s ratio)."""
    jobs = {
        "fp32": build("vtfuse", size, Workload("train_b32", 32, train=True), dev),
        "bf16": build("vtfuse", size, Workload("train_b32", 32, train=True, bf16=True), dev),
    }
    seconds = median_seconds(jobs, repeats)
    return seconds["fp32"] / seconds["bf16"]


def _line(work: Workload, row: dict) -> str:
    ours, theirs = row["vtfuse"], row["transformers"]
    text = (
        f"  {work.name:13s} {work.unit:9s} transformers {theirs[work.unit]:9.2f}  "
        f"vtfuse {ours[work.unit]:9.2f}  ratio {row['ratio']:5.2f}x  "
        f"peak share {theirs['peak_share']:5.1%} / {ours['peak_share']:5.1%}"
    )
    if "memory_ratio" in row:
        text += (
            f"  memory MB {theirs['peak_memory_mb']:7.1f} / {ours['peak_memory_mb']:7.1f} "
            f"({row['memory_ratio']:.2f}x)"
        )
    paths = [p for p in PATHS if p in row and p != "transformers"]
    each = ", ".join(f"{p} {_faster(work, row[p], theirs):.2f}x" for p in paths)
    return text + (
        f"\n  {'':13s} fastest: {row['best_path']} {row['best_ratio']:.2f}x transformers "
        f"eager, {row['vs_best_peer']:.2f}x {row['best_peer']}\n  {'':13s} each over "
        f"transformers eager: {each}"
    )


def _faster(work: Workload, ours: dict, theirs: dict) -> float:
    """How many times faster `ours` is than `theirs` (per-unit figures of one workload)."""
    a, b = ours[work.unit], theirs[work.unit]
    return a / b if work.train else b / a


def markdown(results: dict[str, dict], peak: float) -> str:
    lines = [
        f"fp32 matmul peak measured: {peak / 1e9:.0f} GFLOP/s",
        "",
        "| size | workload | transformers | vtfuse | vtfuse / transformers | share of matmul peak "
        "(transformers / vtfuse) | peak memory MB (transformers / vtfuse) | fastest vtfuse path "
        "/ transformers | / fastest transformers path |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size, rows in results.items():
        for work in WORKLOADS:
            row = rows[work.name]
            theirs, ours = row["transformers"], row["vtfuse"]
            memory = (
                f"{theirs['peak_memory_mb']:.0f} / {ours['peak_memory_mb']:.0f}"
                if "memory_ratio" in row
                else ""
            )
            lines.append(
                f"| {size} | {work.name} | {theirs[work.unit]:.2f} {work.unit} | "
                f"{ours[work.unit]:.2f} {work.unit} | {row['ratio']:.2f}× | "
                f"{theirs['peak_share']:.1%} / {ours['peak_share']:.1%} | {memory} | "
                f"{row['best_path']}: {row['best_ratio']:.2f}× | {row['best_peer']}: "
                f"{row['vs_best_peer']:.2f}× |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small size, 3 repeats")
    parser.add_argument("--sizes", default="", help="comma-separated: small,base")
    parser.add_argument("--repeats", type=int, default=0)
    parser.add_argument("--json", default="", help="write the small size's ratios here")
    parser.add_argument("--markdown", default="", help="write the table here")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument("--memory-probe", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        name, size, work = args.memory_probe
        chosen = next(w for w in WORKLOADS if w.name == work)
        print(memory_probe(name, SIZES[size], chosen))
        return

    dev = device()
    sizes = args.sizes.split(",") if args.sizes else (["small"] if args.quick else list(SIZES))
    repeats = args.repeats or (3 if args.quick else 7)
    peak = matmul_peak(dev)
    print(f"device {dev}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    bf16_peak = matmul_peak(dev, torch.bfloat16)
    print(f"matmul peak: fp32 {peak / 1e9:.0f} GFLOP/s, bf16 {bf16_peak / 1e9:.0f} GFLOP/s")
    results = {}
    for name in sizes:
        size = SIZES[name]
        counts = {model: parameters(MODELS[model](size)) for model in MODELS}
        print(
            f"{name}: image {size.image_size}, patch {size.patch_size}, hidden {size.hidden}, "
            f"{size.layers}+{size.layers} layers, vocab {size.vocab}; parameters "
            f"transformers {counts['transformers'] / 1e6:.2f}M, "
            f"vtfuse {counts['vtfuse'] / 1e6:.2f}M"
        )
        probes = 0 if args.no_memory else (1 if args.quick else 3)
        results[name] = run_size(size, repeats, dev, peak, probes)
        compiles = {k: round(t, 1) for k, t in COMPILE_SECONDS.items() if f", {name}" in k}
        results[name]["compile_seconds"] = compiles
        print(f"  first call (compile) seconds: {compiles}", flush=True)
        if not args.quick:
            ratio = bf16_training(size, repeats, dev)
            results[name]["train_b32_bf16_over_fp32"] = ratio
            print(f"  vtfuse train_b32 bf16 autocast over fp32: {ratio:.2f}x")
    for path in (args.markdown, args.json):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if args.markdown:
        Path(args.markdown).write_text(markdown(results, peak) + "\n")
    if args.json and "small" in results:
        small = results["small"]
        # each workload: vtfuse's fastest path ÷ transformers eager; beside it, which path that
        # was, eager ÷ eager, and the fastest path against transformers' fastest
        ratios = {work.name: small[work.name]["best_ratio"] for work in WORKLOADS}
        ratios["best_path"] = {work.name: small[work.name]["best_path"] for work in WORKLOADS}
        ratios["eager"] = {work.name: small[work.name]["ratio"] for work in WORKLOADS}
        ratios["vs_best_peer_generate_b1"] = small["generate_b1"]["vs_best_peer"]
        if "memory_ratio" in small["train_b32"]:
            ratios["peak_memory"] = small["train_b32"]["memory_ratio"]
        Path(args.json).write_text(json.dumps(ratios, indent=2) + "\n")


if __name__ == "__main__":
    main()
