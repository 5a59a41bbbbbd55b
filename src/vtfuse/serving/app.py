"""`vtfuse serve`: an HTTP API (FastAPI) and a web page over one trained model.

    POST /v1/caption   image (+ beam_size, max_length, attention)  → caption (+ maps per token)
    POST /v1/ask       image, question (+ top_k, attention)        → answers (+ maps per word)
    POST /v1/retrieve  image + texts, or query + images            → ranked candidates
    POST /v1/classify  image, labels (+ template)                  → labels with probabilities
    GET  /healthz, /v1/model, /  (the page), /docs, /openapi.json

Bodies are multipart forms (files as `image` / `images`) or JSON with base64 images
(`image_base64`, `images_base64`). Errors are JSON `{"error": ...}`: 413 for an image over the
byte or pixel limit, 415 for a body or file that is not an image, 422 for a bad field, 503
with Retry-After when the queue is full. Captions and answers are micro-batched; a retrieval or
a zero-shot classification carries its own candidates, so it runs alone, but in the same
bounded queue and on the same model worker: no endpoint's backlog grows without bound, and no
model call runs beside another.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.requests import ClientDisconnect

from vtfuse.pipeline import Pipeline, check_template
from vtfuse.serving.batching import Alone, Busy, MicroBatcher
from vtfuse.serving.requests import (
    RequestError,
    ServeSettings,
    decode_image,
    field_of,
    one_image,
    read_fields,
)
from vtfuse.tasks import CAPTION, RETRIEVAL, VQA
from vtfuse.visualisation.maps import select_layer, to_grid

PAGE = Path(__file__).with_name("page.html")


def _maps(attention: torch.Tensor, grid: tuple[int, int]) -> list:
    """(T, layers, heads, N) → per token an h × w map (mean of layers and heads; a clip's
    summed over its frames), rounded."""
    return to_grid(select_layer(attention), grid).round(decimals=4).tolist()


class Engine:
    """The batched model calls behind the endpoints."""

    def __init__(self, pipe: Pipeline):
        self.pipe = pipe

    def run(self, group: Hashable, payloads: Sequence[Any]) -> list[Any]:
        with torch.inference_mode():
            if isinstance(group, Alone):  # a call of its own: (function, arguments)
                return [function(*args) for function, args in payloads]
            call = {CAPTION.name: self.caption, "ask": self.ask}[group[0]]
            return call(group, payloads)

    def caption(self, group: tuple, images: Sequence[Image.Image]) -> list[dict]:
        _, beam_size, max_length, attention = group
        pipe = self.pipe
        generated = pipe.generate(
            pipe.images_to_tensor(list(images)), beam_size, max_length, need_weights=attention
        )
        results = []
        for row, ids in enumerate(generated.tokens):
            result = {"caption": pipe.tokenizer.decode(ids), "tokens": pipe.tokenizer.pieces(ids)}
            if attention:
                result["attention"] = _maps(generated.attention[row], pipe.model.grid_size)
                result["grid"] = list(pipe.model.grid_size)
            results.append(result)
        return results

    def ask(self, group: tuple, payloads: Sequence[tuple[Image.Image, str]]) -> list[dict]:
        _, top_k, attention = group
        pipe = self.pipe
        images = pipe.images_to_tensor([image for image, _ in payloads])
        tokens, mask = pipe.encode_texts([question for _, question in payloads])
        probabilities, weights = pipe.answer_probabilities(
            images, tokens, mask, need_weights=attention
        )
        results = []
        for row in range(len(payloads)):
            values, indices = probabilities[row].topk(min(top_k, probabilities.shape[-1]))
            answers = [
                {"answer": pipe.tokenizer.answers[i], "probability": round(float(p), 6)}
                for p, i in zip(values, indices.tolist(), strict=True)
            ]
            result: dict[str, Any] = {"answers": answers}
            if attention:
                length = int(mask[row].sum())
                maps = torch.stack([w[row, :, :length] for w in weights]).permute(2, 0, 1, 3)
                result["tokens"] = pipe.tokenizer.pieces(tokens[row, :length].tolist())
                result["attention"] = _maps(maps, pipe.model.grid_size)
                result["grid"] = list(pipe.model.grid_size)
            results.append(result)
        return results


def model_info(pipe: Pipeline, folder: Path | None) -> dict[str, Any]:
    config = pipe.model.config
    trained = {}
    if folder is not None and (folder / "config.json").is_file():
        trained = json.loads((folder / "config.json").read_text()).get("trained", {})
    return {
        "task": pipe.task,
        "capabilities": list(pipe.model.capabilities),  # a joint model: caption, retrieval
        "fusion": config.fusion.name,
        "vision": config.vision.name,
        "text": config.lm.name or "vtfuse",
        "parameters": pipe.model.num_parameters(),
        "trainable_parameters": pipe.model.num_parameters(trainable_only=True),
        "step": trained.get("step"),
        "checkpoint": str(folder) if folder else None,
        "device": str(pipe.device),
        "weights": pipe.weights,
        "runtime": pipe.runtime,  # what decodes captions: torch, compiled or onnx
    }


# -- the app -----------------------------------------------------------------------------------
def _body_doc(fields: dict[str, dict], images: tuple[str, ...] = ("image",)) -> dict:
    """OpenAPI for a body that is a multipart form (image files) or JSON (base64 images):
    `fields` as they are, plus each of `images` ("image": one, "images": several)."""

    def imagefield_of(name: str, encoded: dict) -> dict:
        return encoded if name == "image" else {"type": "array", "items": encoded}

    binary = {"type": "string", "format": "binary"}
    base64_text = {"type": "string", "contentEncoding": "base64"}
    form = {**fields, **{name: imagefield_of(name, binary) for name in images}}
    body = {**fields, **{f"{name}_base64": imagefield_of(name, base64_text) for name in images}}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": {"type": "object", "properties": form}},
                "application/json": {"schema": {"type": "object", "properties": body}},
            },
        }
    }


def create_app(pipe: Pipeline, settings: ServeSettings | None = None, folder: Path | None = None):
    settings = settings or ServeSettings()
    engine = Engine(pipe)
    batcher = MicroBatcher(
        engine.run, settings.max_batch, settings.max_wait_ms, settings.max_queue, settings.threads
    )

    @asynccontextmanager
    async def lifespan(app):
        yield
        await batcher.close()

    app = FastAPI(title="vtfuse", version="1", lifespan=lifespan)
    app.state.batcher = batcher
    add_error_handlers(app)
    add_info_routes(app, model_info(pipe, folder), batcher)
    served = Served(pipe, batcher, settings)
    for add_routes in (add_caption, add_ask, add_retrieve, add_classify):
        add_routes(app, served)
    return app


@dataclass
class Served:
    """What the task routes share: the model, the batcher in front of it, the limits."""

    pipe: Pipeline
    batcher: MicroBatcher
    settings: ServeSettings

    def require(self, task: str) -> None:
        if not self.pipe.serves(task):
            raise RequestError(
                422, f"this server runs a {self.pipe.task!r} model; that needs {task!r}"
            )


def add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as JSON `{"error": ...}`: the request's fault (4xx), busy (503 with
    Retry-After), or ours (500, without a traceback)."""

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError):
        return JSONResponse({"error": error.message}, status_code=error.status)

    @app.exception_handler(Busy)
    async def busy(request: Request, error: Busy):
        return JSONResponse(
            {"error": f"busy: {error}; retry shortly"},
            status_code=503,
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, error: ClientDisconnect):  # left mid-body: not our error
        return JSONResponse({"error": "the client left before sending its body"}, 400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):  # no traceback leaves the server
        return JSONResponse({"error": f"internal error: {type(error).__name__}"}, status_code=500)


def add_info_routes(app: FastAPI, info: dict[str, Any], batcher: MicroBatcher) -> None:
    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model() -> dict:
        return {**info, "batches": batcher.stats.batches, "mean_batch": batcher.stats.mean_batch}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE.read_text()


CAPTION_FIELDS = {
    "beam_size": {"type": "integer", "minimum": 1, "maximum": 8},
    "max_length": {"type": "integer", "minimum": 1},
    "attention": {"type": "boolean"},
}


def add_caption(app: FastAPI, served: Served) -> None:
    pipe, settings = served.pipe, served.settings

    @app.post("/v1/caption", openapi_extra=_body_doc(CAPTION_FIELDS))
    async def caption(request: Request) -> dict:
        served.require(CAPTION.name)
        fields, files = await read_fields(request)
        image = one_image(files, settings)
        beam = field_of(fields, "beam_size", int, 1, low=1)
        if beam > settings.max_beam_size:
            raise RequestError(422, f"field 'beam_size' must be at most {settings.max_beam_size}")
        longest = pipe.model.config.text.max_length - 1
        max_length = min(field_of(fields, "max_length", int, longest, low=1), longest)
        attention = field_of(fields, "attention", bool, False)
        if attention and beam > 1:
            raise RequestError(422, "attention maps come from greedy decoding: use beam_size 1")
        return await served.batcher.submit((CAPTION.name, beam, max_length, attention), image)


ASK_FIELDS = {
    "question": {"type": "string"},
    "top_k": {"type": "integer", "minimum": 1},
    "attention": {"type": "boolean"},
}


def add_ask(app: FastAPI, served: Served) -> None:
    @app.post("/v1/ask", openapi_extra=_body_doc(ASK_FIELDS))
    async def ask(request: Request) -> dict:
        served.require(VQA.name)
        fields, files = await read_fields(request)
        image = one_image(files, served.settings)
        question = field_of(fields, "question", str)
        if not question.strip():
            raise RequestError(422, "field 'question' is empty")
        top_k = field_of(fields, "top_k", int, 5, low=1)
        attention = field_of(fields, "attention", bool, False)
        return await served.batcher.submit(("ask", top_k, attention), (image, question))


RETRIEVE_FIELDS = {
    "texts": {"type": "array", "items": {"type": "string"}},
    "query": {"type": "string"},
    "top_k": {"type": "integer", "minimum": 1},
}


def add_retrieve(app: FastAPI, served: Served) -> None:
    """A `query` ranks the uploaded `images`; an `image` ranks the `texts`."""
    pipe, settings, batcher = served.pipe, served.settings, served.batcher

    @app.post("/v1/retrieve", openapi_extra=_body_doc(RETRIEVE_FIELDS, ("image", "images")))
    async def retrieve(request: Request) -> dict:
        served.require(RETRIEVAL.name)
        fields, files = await read_fields(request)
        top_k = field_of(fields, "top_k", int, 5, low=1)
        if "query" in fields:
            candidates = files.get("images", [])
            if len(candidates) > settings.max_images:
                raise RequestError(422, f"at most {settings.max_images} 'images' per request")
            images = [decode_image(d, settings, f"images[{i}]") for i, d in enumerate(candidates)]
            if not images:
                raise RequestError(422, "a 'query' needs candidate 'images'")
            query = str(fields["query"])
            ranked = await batcher.submit(Alone(), (pipe.retrieve_images, (query, images, top_k)))
            return {"results": [{"index": i, "score": round(s, 6)} for i, s in ranked]}
        image = one_image(files, settings)
        texts = field_of(fields, "texts", list)
        if (
            not texts
            or len(texts) > settings.max_texts
            or not all(isinstance(t, str) for t in texts)
        ):
            raise RequestError(422, f"'texts' must hold 1 to {settings.max_texts} strings")
        ranked = await batcher.submit(Alone(), (pipe.retrieve_texts, (image, texts, top_k)))
        return {
            "results": [{"index": i, "text": texts[i], "score": round(s, 6)} for i, s in ranked]
        }


CLASSIFY_FIELDS = {
    "labels": {"type": "array", "items": {"type": "string"}},
    "template": {"type": "string"},
}


def add_classify(app: FastAPI, served: Served) -> None:
    @app.post("/v1/classify", openapi_extra=_body_doc(CLASSIFY_FIELDS))
    async def classify(request: Request) -> dict:
        served.require(RETRIEVAL.name)
        fields, files = await read_fields(request)
        image = one_image(files, served.settings)
        labels = [str(label) for label in field_of(fields, "labels", list) if str(label).strip()]
        template = field_of(fields, "template", str, "{}")
        if not labels:
            raise RequestError(422, "need 'labels': the classes to choose among")
        try:
            check_template(template)
        except ValueError as error:
            raise RequestError(422, str(error)) from None
        job = (served.pipe.classify, (image, labels, template))
        ranked = await served.batcher.submit(Alone(), job)
        return {"labels": [{"label": label, "probability": round(p, 6)} for label, p in ranked]}
