"""Reading a request: its fields and images (multipart or JSON with base64), each refusal a
`RequestError` with the status and the field it names (413 too big, 415 not an image, 422 a
bad field), and the server's limits (`ServeSettings`)."""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError


@dataclass(frozen=True)
class ServeSettings:
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 256
    threads: int = 1  # PyTorch threads of the inference thread (see serving.batching)
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 40_000_000
    max_texts: int = 1000  # candidates per retrieval request
    max_images: int = 64  # candidate images per retrieval request
    max_beam_size: int = 8  # a beam's memory grows with its width: a bound, not a DoS


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# -- reading requests --------------------------------------------------------------------------
def decode_image(data: bytes, settings: ServeSettings, name: str = "image") -> Image.Image:
    if len(data) > settings.max_image_bytes:
        raise RequestError(
            413, f"{name}: {len(data)} bytes, over the {settings.max_image_bytes} limit"
        )
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > settings.max_image_pixels:
            raise RequestError(
                413, f"{name}: {width}×{height} pixels, over the {settings.max_image_pixels} limit"
            )
        image.load()
        return image.convert("RGB")
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise RequestError(415, f"{name}: not an image Pillow can read") from None


async def read_fields(request) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
    """(fields, images by field name) from a multipart form or a JSON body."""
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    if kind == "multipart/form-data":
        form = await request.form()
        fields: dict[str, Any] = {}
        files: dict[str, list[bytes]] = {}
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                files.setdefault(key, []).append(await value.read())
            else:
                fields.setdefault(key, []).append(value)
        return {k: v[0] if len(v) == 1 else v for k, v in fields.items()}, files
    if kind == "application/json":
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError(422, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError(422, "the JSON body must be an object")
        files = {}
        for key, target in (("image_base64", "image"), ("images_base64", "images")):
            value = body.pop(key, None)
            if value is None:
                continue
            values = value if isinstance(value, list) else [value]
            try:
                files[target] = [base64.b64decode(v, validate=True) for v in values]
            except (binascii.Error, TypeError, ValueError):  # ValueError: not ASCII
                raise RequestError(422, f"{key}: not base64") from None
        return body, files
    raise RequestError(
        415, f"send multipart/form-data or application/json, not {kind or 'nothing'}"
    )


def field_of(fields: dict, name: str, kind: type, default: Any = None, low: float | None = None):
    value = fields.get(name, default)
    if value is None:
        raise RequestError(422, f"missing field '{name}'")
    try:
        if kind is bool:
            value = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        elif kind is list:
            value = as_list(value)
        else:
            value = kind(value)
    except (TypeError, ValueError, json.JSONDecodeError):
        raise RequestError(422, f"field '{name}' must be {kind.__name__}, got {value!r}") from None
    if low is not None and value < low:
        raise RequestError(422, f"field '{name}' must be at least {low}, got {value}")
    return value


def as_list(value: Any) -> list:
    """A list as JSON sends it, or as a form does: a JSON array, or comma-separated text."""
    if isinstance(value, list):
        return value
    text = str(value)
    return json.loads(text) if text.startswith("[") else [v.strip() for v in text.split(",")]


def one_image(files: dict, settings: ServeSettings) -> Image.Image:
    images = files.get("image", [])
    if len(images) != 1:
        raise RequestError(422, "send exactly one 'image' (a file, or image_base64 in JSON)")
    return decode_image(images[0], settings)


# -- the model side: batched calls -------------------------------------------------------------
