"""The base of every task model: a vision encoder, a config, and save/load in the
`from_pretrained` / `save_pretrained` style (a folder with config.json, model.safetensors and
tokenizer.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from vtfuse.config import FORMAT_VERSION, ModelConfig, TextConfig, from_dict, to_dict
from vtfuse.data.images import normalise
from vtfuse.data.tokenizer import AnyTokenizer, Tokenizer, load_tokenizer
from vtfuse.encoders.vision import create_vision_encoder
from vtfuse.linear import Linear
from vtfuse.registry import Registry

TASKS: Registry[TaskModel] = Registry("task")
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file or field."""


class TaskModel(nn.Module):
    task: str

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision = create_vision_encoder(config.vision)

    def init_weights(self) -> None:
        """Linear weights N(0, 1/fan_in) (LeCun et al. 1998) and zero biases; token embeddings
        N(0, 1/dim), scaled by √dim on input (Vaswani et al. 2017, §3.4) so a tied output layer
        starts with unit-scale logits while every word enters the residual stream at unit scale.

        Measured on the synthetic VQA task, with dim 128: GPT-2's N(0, 0.02) — tuned for widths
        of 768 and more — leaves the attention logits ~20× smaller than N(0, 1/fan_in), the
        cross-attention stays uniform over the image and training sits at chance for thousands
        of steps; with small embeddings the first self-attention's output drowns each word's
        identity, and "red" cannot learn to look at red."""
        for module in _own_modules(self):
            if isinstance(module, (nn.Linear, Linear)):
                nn.init.normal_(module.weight, mean=0.0, std=module.in_features**-0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=module.embedding_dim**-0.5)

    def encode_image(self, images: Tensor) -> Tensor:
        """uint8 images (I, 3, H, W) → image tokens (I, h·w, dim)."""
        return self.vision(normalise(images))

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.vision.grid_size

    def training_loss(self, batch: dict[str, Tensor], label_smoothing: float = 0.0) -> Tensor:
        raise NotImplementedError

    def validation_metrics(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """Per-batch means reported during training (`loss` picks the best checkpoint)."""
        return {"loss": self.training_loss(batch).item()}

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def save_pretrained(
        self, folder: str | Path, tokenizer: AnyTokenizer, trained: dict | None = None
    ) -> None:
        """config.json (with `trained`: e.g. the step and epoch), the weights, the tokenizer."""
        from vtfuse import __version__

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        header = {"format_version": FORMAT_VERSION, "vtfuse_version": __version__}
        config = {**header, "model": to_dict(self.config), "trained": trained or {}}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        self.save_weights(folder / WEIGHTS_FILE)
        tokenizer.save(folder)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint holds: every trainable parameter, once (a tied LM head is its
        embedding's alias), and the buffers of modules that train (batch-norm statistics).
        Frozen pretrained weights are left out: they load from where they came from, the
        LM's hub name or folder, the packaged EfficientNet weights."""
        trains = {
            name
            for name, module in self.named_modules()
            if any(p.requires_grad for p in module.parameters(recurse=False))
        }
        buffers = {id(b) for b in self.buffers()}
        kept, seen = {}, set()
        for name, tensor in self.state_dict(keep_vars=True).items():
            owner = name.rpartition(".")[0]
            keep = tensor.requires_grad or (id(tensor) in buffers and owner in trains)
            if keep and id(tensor) not in seen:
                kept[name] = tensor.detach()
                seen.add(id(tensor))
        return kept

    def save_weights(self, path: Path) -> None:
        save_file({n: t.contiguous() for n, t in self.trainable_state_dict().items()}, str(path))

    def load_weights(self, path: Path, format_version: int = FORMAT_VERSION):
        """Load saved weights (written in `format_version`); returns the (missing, unexpected)
        names."""
        saved, expected = load_file(str(path)), set(self.trainable_state_dict())
        for version in range(format_version, FORMAT_VERSION):
            saved = UPGRADES[version](self, saved)
        aliases = _tied_names(self)  # a file written with the other name of a tied weight
        saved = {
            aliases.get(n, n) if aliases.get(n) in expected else n: t for n, t in saved.items()
        }
        self.load_state_dict(saved, strict=False)
        return sorted(expected - set(saved)), sorted(set(saved) - expected)


def _own_modules(root: nn.Module):
    """`root`'s modules, without descending into pretrained ones (`encoders.pretrained`)."""
    yield root
    for child in root.children():
        if not getattr(child, "vtfuse_pretrained", False):
            yield from _own_modules(child)


def _tied_names(model: nn.Module) -> dict[str, str]:
    """Each name of a shared tensor → the name `state_dict` lists first for it."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        aliases[name] = first.setdefault(id(tensor), name)
    return {n: f for n, f in aliases.items() if n != f}


def _from_format_2(model: nn.Module, saved: dict[str, Tensor]) -> dict[str, Tensor]:
    """Format 2 → 3: `vtfuse.linear.Linear` weights became (in, out), were (out, in); the
    position table moved into the text side's contextualiser (`vtfuse.encoders.context`)."""
    renamed = {"text.position_embedding.weight": "text.context.position_embedding.weight"}
    saved = {renamed.get(n, n): t for n, t in saved.items()}
    names = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Linear)}
    return {n: t.t().contiguous() if n in names else t for n, t in saved.items()}


# UPGRADES[v] turns weights written in format v into format v + 1; older formats are refused
UPGRADES = {2: _from_format_2}


def read_model_config(folder: str | Path) -> ModelConfig:
    return read_checkpoint_config(folder)[0]


def read_checkpoint_config(folder: str | Path) -> tuple[ModelConfig, int]:
    """A model folder's config and the format its weights were written in."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a vtfuse model folder: no {CONFIG_FILE}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    version = data.get("format_version")
    if version != FORMAT_VERSION and version not in UPGRADES:
        raise CheckpointError(
            f"{path}: field 'format_version' is {version!r} (written by vtfuse "
            f"{data.get('vtfuse_version', '?')}); this vtfuse reads formats "
            f"{sorted({*UPGRADES, FORMAT_VERSION})}"
        )
    return from_dict(ModelConfig, data.get("model", {}), where=f"{path}: model"), version


def create_model(config: ModelConfig) -> TaskModel:
    """The task's model; with `config.lm.name`, the task around that pretrained LM
    (registered as "<task>_lm")."""
    if config.lm.name and config.text.encoder != TextConfig.encoder:
        raise ValueError(
            f"text.encoder {config.text.encoder!r} chooses vtfuse's own text side, which the "
            f"pretrained lm.name {config.lm.name!r} replaces: give one of the two"
        )
    return TASKS.get(f"{config.task}_lm" if config.lm.name else config.task)(config)


def load_pretrained(
    folder: str | Path, device: str | torch.device = "cpu"
) -> tuple[TaskModel, AnyTokenizer]:
    """Load a model folder written by `save_pretrained` (weights from safetensors only)."""
    folder = Path(folder)
    config, version = read_checkpoint_config(folder)
    model = create_model(config)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(
            f"{folder}: no {WEIGHTS_FILE} (vtfuse loads weights from safetensors only)"
        )
    missing, unexpected = model.load_weights(weights, version)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model.to(device).eval(), load_tokenizer(folder)


@dataclass
class WarmStart:
    """What `warm_start` copied."""

    tensors: int  # weights copied whole (same name, same shape)
    words: int  # token-embedding rows copied for words both vocabularies share
    left: list[str]  # the source's weights that found no same-named, same-shaped target


def _fusion_block_key(name: str) -> tuple[int, str] | None:
    """A fusion block inserted in a pretrained LM, named by its layer and its own parameter:
    "lm.bert.encoder.layer.2.fusion.attn.to_q.weight" (a BERT decoder) and
    "lm.encoder.layer.2.fusion.attn.to_q.weight" (the same BERT as an encoder) → (2, ...)."""
    if not name.startswith("lm.") or ".fusion." not in name:
        return None
    path, parameter = name.split(".fusion.", 1)
    return int(path.rsplit(".", 1)[1]), parameter


def _shared_words(tokenizer: AnyTokenizer, source: AnyTokenizer) -> list[tuple[int, int]]:
    """(row, source row) of the words two word vocabularies share (an LM's tokenizer: none)."""
    if not (isinstance(tokenizer, Tokenizer) and isinstance(source, Tokenizer)):
        return []
    return [
        (row, source.word_ids[word])
        for row, word in enumerate(tokenizer.words)
        if word in source.word_ids
    ]


def warm_start(model: TaskModel, tokenizer: AnyTokenizer, folder: str | Path) -> WarmStart:
    """Initialise `model` from another vtfuse model, e.g. a VQA model from a captioner, as
    captioning pretraining does for VirTex (Desai & Johnson 2021) and BLIP: every weight with
    the same name and shape is copied, and the token embedding row by row for the words the
    two vocabularies share. The rest (a VQA answer head, say) keeps its initialisation."""
    source, source_tokenizer = load_pretrained(folder)
    target, weights = model.state_dict(), source.state_dict()
    by_block = {_fusion_block_key(name): name for name in target if _fusion_block_key(name)}
    embedding, tied_head = "text.token_embedding.weight", "lm_head.weight"
    tensors, left = 0, []
    with torch.no_grad():
        for name, weight in weights.items():
            if name in (embedding, tied_head):
                continue
            to = name if name in target else by_block.get(_fusion_block_key(name), name)
            if to in target and target[to].shape == weight.shape:
                target[to].copy_(weight)
                tensors += 1
            else:
                left.append(name)
        shared = _shared_words(tokenizer, source_tokenizer)  # both: vtfuse's own text side
        if shared and weights[embedding].shape[1] == target[embedding].shape[1]:
            rows, from_rows = (list(column) for column in zip(*shared, strict=True))
            target[embedding][rows] = weights[embedding][from_rows].to(target[embedding].dtype)
        else:
            shared = []
    if tensors == 0:
        raise CheckpointError(
            f"{folder}: no weight matches this model by name and shape; nothing to start from"
        )
    return WarmStart(tensors, len(shared), left)
