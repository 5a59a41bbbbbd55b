"""Inference on a trained model: captions, answers, and the attention behind them.

pipe = vtfuse.load("runs/caption")          # a run folder (uses best/) or a model folder
pipe.caption(["cat.png"])                   # → ["a cat on a mat."]
pipe.ask("scene.png", "what shape is the red object?")   # → [("circle", 0.97), ...]
pipe.ask("clip.mp4", "which way does the red circle move?")  # a clip model (vision.frames > 1):
                                            # a video file, a folder of frames or a frame list
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from vtfuse.data.clips import Visual, is_still, load_visual
from vtfuse.data.images import blank_like, load_image
from vtfuse.data.items import Truncation, pad_tokens
from vtfuse.data.tokenizer import AnyTokenizer
from vtfuse.generation import (
    Generated,
    IncrementalDecoder,
    beam_search,
    greedy,
    most_likely,
    nucleus,
)
from vtfuse.generation.runtimes import caption_decoder, choose_runtime
from vtfuse.models.base import TaskModel
from vtfuse.models.factory import load_pretrained
from vtfuse.quantisation import convert_weights
from vtfuse.runtime import resolve_device
from vtfuse.tasks import CAPTION, CLASSIFY, RETRIEVAL, VQA, task_spec
from vtfuse.training.checkpoint import resolve_model_folder
from vtfuse.visualisation import save_attention_figure, select_layer, to_grid

ImageLike = Visual  # a still image (path or PIL), a video file, a folder of frames, a frame list


@dataclass(frozen=True)
class Sampling:
    """Sample captions instead of taking the most likely word: nucleus sampling."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None  # the same seed, the same captions

    def pick(self, device: torch.device):
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device).manual_seed(self.seed)
        return nucleus(self.temperature, self.top_p, generator)


@dataclass
class Attention:
    """Where each word looked: `maps` (T, layers, heads, N) over the image's h × w grid."""

    words: list[str]
    maps: Tensor
    grid: tuple[int, int]
    text: str = ""  # the words as text


class Pipeline:
    def __init__(
        self,
        model: TaskModel,
        tokenizer: AnyTokenizer,
        device: torch.device,
        weights: str = "fp32",
        decoder: IncrementalDecoder | None = None,
        runtime: str = "torch",
    ):
        self.model, self.tokenizer, self.device = model.eval(), tokenizer, device
        self.weights = weights  # the linear layers' precision (see vtfuse.quantisation)
        # what decodes captions: the model itself, its compiled packages or its graphs on ONNX
        # Runtime (`runtime`, see vtfuse.generation.runtimes)
        self.decoder, self.runtime = decoder or model, runtime

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str = "auto",
        allow_pickle: bool = False,
        weights: str = "fp32",
        runtime: str = "auto",
    ) -> Pipeline:
        """A run or model folder's model; `allow_pickle`: see `load_pretrained`; `weights`:
        the linear layers' precision for inference (see `vtfuse.quantisation`); `runtime`:
        what decodes captions, "torch", "compiled", "onnx" (a folder written by `vtfuse export
        --onnx`) or "auto" (see `vtfuse.generation.runtimes.choose_runtime`)."""
        resolved = resolve_device(device)
        folder = resolve_model_folder(path)
        runtime = choose_runtime(runtime, folder, resolved, weights)
        model, tokenizer = load_pretrained(folder, resolved, allow_pickle)
        decoder = caption_decoder(runtime, model, folder, resolved, weights)
        return cls(convert_weights(model, weights), tokenizer, resolved, weights, decoder, runtime)

    @property
    def task(self) -> str:
        return self.model.task

    def serves(self, task: str) -> bool:
        """Whether the model can be used for `task` (a joint model: caption and retrieval)."""
        return task in self.model.capabilities

    def _require(self, *tasks: str) -> None:
        if not any(self.serves(task) for task in tasks):
            wanted = " or ".join(repr(t) for t in tasks)
            raise ValueError(f"this is a {self.task!r} model; that needs a {wanted} model")

    def images_to_tensor(self, images: list[ImageLike]) -> Tensor:
        """uint8 (B, 3, H, W); for a clip model (B, frames, 3, H, W), each clip's frames
        sampled uniformly and each still image repeated (see vtfuse.data.clips)."""
        vision = self.model.config.vision
        loaded = [load_visual(image, vision.image_size, vision.frames) for image in images]
        return torch.stack(loaded).to(self.device)

    def background(self, image: ImageLike) -> Image.Image:
        """The picture attention is drawn over: a still image itself, a clip's middle frame."""
        if isinstance(image, Image.Image):
            return image
        if is_still(image):
            return load_image(image)
        middle = load_visual(image, self.model.config.vision.image_size, 1)
        return Image.fromarray(middle.permute(1, 2, 0).numpy())

    # -- captioning ---------------------------------------------------------------------------
    def generate(
        self,
        images: Tensor,
        beam_size: int = 1,
        max_length: int | None = None,
        length_penalty: float = 1.0,
        need_weights: bool = False,
        blind: bool = False,
        sampling: Sampling | None = None,
    ) -> Generated:
        """uint8 images (B, 3, H, W) → generated ids (and attention, greedy or sampled)."""
        self._require(CAPTION.name)
        max_length = max_length or self.model.config.text.max_length - 1
        if blind:
            images = blank_like(images)
        bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
        if beam_size > 1:
            if need_weights or sampling:
                raise ValueError("attention maps and sampling decode one path: use beam_size 1")
            return beam_search(
                self.decoder, images, beam_size, max_length, length_penalty, bos, eos
            )
        pick = sampling.pick(images.device) if sampling else most_likely
        decoder = self.model if need_weights else self.decoder  # attention maps: PyTorch's
        return greedy(decoder, images, max_length, bos, eos, need_weights, pick=pick)

    def caption(
        self,
        images: list[ImageLike],
        beam_size: int = 1,
        max_length: int | None = None,
        length_penalty: float = 1.0,
        sampling: Sampling | None = None,
    ) -> list[str]:
        generated = self.generate(
            self.images_to_tensor(images), beam_size, max_length, length_penalty, sampling=sampling
        )
        return [self.tokenizer.decode(ids) for ids in generated.tokens]

    def caption_with_shots(
        self,
        image: ImageLike,
        shots: list[tuple[ImageLike, str]],
        max_length: int | None = None,
        sampling: Sampling | None = None,
    ) -> str:
        """Caption `image` after in-context examples (Flamingo's few-shot prompting): the
        prompt is <s> caption₁ </s> <s> caption₂ </s> ... <s>, each <s> opening its image, and
        each word sees only its latest image."""
        self._require(CAPTION.name)
        if getattr(self.model, "image_token_id", None) is None:
            raise ValueError("--shots needs a captioner built on a pretrained LM (train with --lm)")
        bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
        prompt: list[int] = []
        for _, caption in shots:  # with <s> = </s> (GPT-2), one token ends and opens
            prompt += self.tokenizer.encode(caption, bos=True, eos=eos != bos)
        prompt.append(bos)
        images = self.images_to_tensor([*(shot for shot, _ in shots), image])[None]
        pick = sampling.pick(self.device) if sampling else most_likely
        max_length = max_length or self.model.config.text.max_length - 1
        generated = greedy(
            self.model, images, max_length, bos, eos, prompt=torch.tensor([prompt]), pick=pick
        )
        return self.tokenizer.decode(generated.tokens[0])

    def caption_attention(self, image: ImageLike, max_length: int | None = None) -> Attention:
        generated = self.generate(
            self.images_to_tensor([image]), max_length=max_length, need_weights=True
        )
        ids = generated.tokens[0]
        words = self.tokenizer.pieces(ids)
        text = self.tokenizer.decode(ids)
        return Attention(words, generated.attention[0], self.model.grid_size, text)

    # -- question answering -------------------------------------------------------------------
    def encode_texts(self, questions: list[str]) -> tuple[Tensor, Tensor]:
        """Token ids (B, T) and mask of texts as an encoder reads them; a text longer than
        text.max_length (less one position for [CLS]) is cut, with one TextTruncated warning."""
        cut = Truncation(self.model.config.text.max_length)
        ids = [
            cut.fit(
                self.tokenizer.encode(q), cut.max_length - 1, f"text {i + 1} of {len(questions)}"
            )
            or [self.tokenizer.unk_id]
            for i, q in enumerate(questions)
        ]
        cut.warn()
        tokens, mask = pad_tokens(ids)
        return tokens.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def answer_probabilities(
        self,
        images: Tensor,
        tokens: Tensor,
        token_mask: Tensor,
        image_index: Tensor | None = None,
        need_weights: bool = False,
        blind: bool = False,
    ) -> tuple[Tensor, list[Tensor]]:
        """Probabilities over the answers (B, A) and, if asked, per-layer attention."""
        self._require(VQA.name, CLASSIFY.name)
        if blind:
            images = blank_like(images)
        logits, weights = self.model(
            images, tokens, token_mask, image_index, need_weights=need_weights
        )
        return logits.float().softmax(-1), weights

    def ask(self, image: ImageLike, question: str, top_k: int = 5) -> list[tuple[str, float]]:
        tokens, mask = self.encode_texts([question])
        probs, _ = self.answer_probabilities(self.images_to_tensor([image]), tokens, mask)
        values, indices = probs[0].topk(min(top_k, probs.shape[-1]))
        return [(self.tokenizer.answers[i], float(p)) for p, i in zip(values, indices, strict=True)]

    def predict(self, image: ImageLike, text: str, top_k: int = 5) -> list[tuple[str, float]]:
        """A pair classifier's labels for (image, text), most likely first."""
        self._require(CLASSIFY.name)
        return self.ask(image, text, top_k)

    def question_attention(self, image: ImageLike, question: str) -> Attention:
        tokens, mask = self.encode_texts([question])
        _, weights = self.answer_probabilities(
            self.images_to_tensor([image]), tokens, mask, need_weights=True
        )
        maps = torch.stack([w[0] for w in weights]).permute(2, 0, 1, 3).cpu()  # (T, layers, H, N)
        words = self.tokenizer.pieces(tokens[0].tolist())
        return Attention(words, maps, self.model.grid_size, question)

    # -- retrieval and matching --------------------------------------------------------------
    @torch.no_grad()
    def embed_images(self, images: Tensor, batch_size: int = 64) -> tuple[Tensor, Tensor]:
        """uint8 images (I, 3, H, W) → unit embeddings (I, D) and image tokens (I, N, d)."""
        self._require(RETRIEVAL.name)
        parts = [
            self.model.embed_images(images[i : i + batch_size])
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 256) -> Tensor:
        self._require(RETRIEVAL.name)
        parts = []
        for i in range(0, len(texts), batch_size):
            parts.append(self.model.embed_texts(*self.encode_texts(texts[i : i + batch_size])))
        return torch.cat(parts)

    @torch.no_grad()
    def match_scores(
        self, texts: list[str], image_tokens: Tensor, pairs: Tensor, batch_size: int = 256
    ) -> Tensor:
        """Matching-head scores (logit of match − no match) for (text, image) index pairs."""
        scores = []
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            tokens, mask = self.encode_texts([texts[t] for t in chunk[:, 0].tolist()])
            logits, _ = self.model.match_logits(
                tokens, mask, image_tokens, chunk[:, 1].to(self.device)
            )
            scores.append(logits[:, 1] - logits[:, 0])
        return torch.cat(scores)

    def rerank(
        self,
        similarity: Tensor,
        texts: list[str],
        image_tokens: Tensor,
        k: int = 16,
        contrastive_weight: float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Re-score each image's top-k texts and each text's top-k images with the matching
        head (ALBEF's and BLIP's inference): → (image→text, text→image) score matrices in
        which the re-scored candidates rank first, in their new order.

        A candidate's score is the sum of the two models' log-likelihoods (a product of
        experts): the matching head's log-odds log p(match)/p(no match) plus the contrastive
        logit s · cos(image, text), which is a log-probability up to a constant per query.
        ALBEF and BLIP add the raw cosine to the match logit instead. Measured on one quickstart
        retrieval model (9131fc5's first run; benchmarks/rerank.py, README "Retrieval: why it
        fell and what fixed it" for the rest), R@1 image→text / text→image: the dual encoder
        0.947 / 0.915, re-ranked by the head alone 0.887 / 0.767, + cosine 0.917 / 0.817,
        + s · cosine 0.987 / 0.947. `contrastive_weight` replaces s (0: the head alone)."""
        ranked = []
        scale = self.model.scale.item() if contrastive_weight is None else contrastive_weight
        for by_image in (True, False):
            view = similarity if by_image else similarity.T
            top = view.topk(min(k, view.shape[1]), dim=1).indices  # (queries, k)
            queries = torch.arange(view.shape[0], device=view.device)[:, None].expand_as(top)
            text, image = (top, queries) if by_image else (queries, top)
            pairs = torch.stack([text.flatten(), image.flatten()], dim=1)
            scores = self.match_scores(texts, image_tokens, pairs).view_as(top)
            scores = scores + scale * view.gather(1, top)
            rescored = (view - view.max() - 1).scatter(1, top, 1e4 + scores.to(view.dtype))
            ranked.append(rescored if by_image else rescored.T)
        return ranked[0], ranked[1]

    def retrieve_images(self, query: str, images: list[ImageLike], top_k: int = 5):
        """The images best described by `query`: [(index, score)], best first."""
        embeddings, _ = self.embed_images(self.images_to_tensor(images))
        scores = (embeddings @ self.embed_texts([query]).T)[:, 0]
        values, indices = scores.topk(min(top_k, len(images)))
        return list(zip(indices.tolist(), values.tolist(), strict=True))

    def retrieve_texts(self, image: ImageLike, texts: list[str], top_k: int = 5):
        """The texts that best describe `image`: [(index, score)], best first."""
        embedding, _ = self.embed_images(self.images_to_tensor([image]))
        scores = (self.embed_texts(texts) @ embedding.T)[:, 0]
        values, indices = scores.topk(min(top_k, len(texts)))
        return list(zip(indices.tolist(), values.tolist(), strict=True))

    def classify(
        self, image: ImageLike, labels: list[str], template: str = "{}"
    ) -> list[tuple[str, float]]:
        """Zero-shot classification (CLIP's recipe): each label as a text through `template`,
        softmax over the image's similarities at the model's temperature."""
        check_template(template)
        embedding, _ = self.embed_images(self.images_to_tensor([image]))
        texts = self.embed_texts([template.format(label) for label in labels])
        probabilities = (self.model.scale * texts @ embedding.T)[:, 0].float().softmax(0)
        order = probabilities.argsort(descending=True).tolist()
        return [(labels[i], probabilities[i].item()) for i in order]

    # -- pictures ------------------------------------------------------------------------------
    def draw_attention(
        self,
        image: ImageLike,
        out: str | Path,
        question: str | None = None,
        layer: int | None = None,
    ) -> tuple[Path, str]:
        """Save one panel per generated (or question) token; return the path and the text.
        A clip's maps are summed over its frames and drawn over its middle frame."""
        pil = self.background(image)
        if not isinstance(image, Image.Image) and is_still(image):
            image = pil  # decoded once
        if task_spec(self.task).label:  # a question (or text) in, a class out
            if not question:
                raise ValueError(f"a {self.task} model needs --question (its text)")
            attention = self.question_attention(image, question)
            answer, probability = self.ask(image, question, top_k=1)[0]
            text = f"Q: {question}  A: {answer} ({probability:.0%})"
        else:
            attention = self.caption_attention(image)
            text = attention.text
        grids = to_grid(select_layer(attention.maps, layer), attention.grid)
        path = save_attention_figure(
            pil,
            attention.words,
            grids,
            out,
            title=f"{text}  [{'mean of layers' if layer is None else f'layer {layer}'}]",
        )
        return path, text


def load(
    path: str | Path,
    device: str = "auto",
    allow_pickle: bool = False,
    weights: str = "fp32",
    runtime: str = "auto",
) -> Pipeline:
    return Pipeline.load(path, device, allow_pickle, weights, runtime)


def check_template(template: str) -> None:
    """A zero-shot prompt must hold exactly one `{}`, where the label goes, and no other
    replacement field: parsed as `str.format` parses it, so "{} {}", "{x}{}" or a stray "{"
    is refused here rather than raising inside `format` (or naming a label twice)."""
    try:
        fields = [
            (name, spec, conversion)
            for _, name, spec, conversion in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError as error:
        raise ValueError(f"template {template!r} is not a format string: {error}") from None
    if fields != [("", "", None)]:
        raise ValueError(
            f"template {template!r} needs exactly one {{}} where the label goes and no other "
            f"{{...}} field; write a literal brace as {{{{ or }}}}"
        )
