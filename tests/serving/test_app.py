"""`vtfuse serve`: the API through FastAPI's TestClient, errors included, and micro-batching."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time

import pytest
import torch
from PIL import Image

from tests.helpers import require_module, tiny_pipeline

require_module("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from vtfuse.serving import Busy, MicroBatcher, ServeSettings, create_app  # noqa: E402

pipeline = tiny_pipeline


def png(colour=(200, 30, 30), size=(32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def captioner():
    with TestClient(create_app(pipeline("caption"))) as client:
        yield client


@pytest.fixture(scope="module")
def answerer():
    with TestClient(create_app(pipeline("vqa"))) as client:
        yield client


def test_health_model_page_and_schema(captioner):
    assert captioner.get("/healthz").json() == {"status": "ok"}
    info = captioner.get("/v1/model").json()
    assert (
        info["task"] == "caption" and info["parameters"] > 0 and info["fusion"] == "cross_attention"
    )
    assert "<script>" in captioner.get("/").text
    schema = captioner.get("/openapi.json").json()
    body = schema["paths"]["/v1/caption"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)


def test_caption_by_form_and_by_json_agree_and_equal_the_pipeline(captioner):
    pipe = pipeline("caption")
    expected = pipe.caption([Image.open(io.BytesIO(png()))])[0]
    by_form = captioner.post("/v1/caption", files={"image": ("a.png", png(), "image/png")})
    encoded = base64.b64encode(png()).decode()
    by_json = captioner.post("/v1/caption", json={"image_base64": encoded})
    assert by_form.status_code == by_json.status_code == 200
    assert by_form.json()["caption"] == by_json.json()["caption"] == expected


def test_caption_attention_has_a_grid_map_per_token(captioner):
    out = captioner.post(
        "/v1/caption", files={"image": ("a.png", png(), "image/png")}, data={"attention": "true"}
    ).json()
    assert len(out["attention"]) == len(out["tokens"]) and out["grid"] == [3, 3]
    for grid in out["attention"]:
        assert len(grid) == 3 and all(len(row) == 3 for row in grid)
        assert sum(map(sum, grid)) == pytest.approx(1.0, abs=1e-3)


def test_ask_returns_ranked_answers_and_word_maps(answerer):
    out = answerer.post(
        "/v1/ask",
        files={"image": ("a.png", png(), "image/png")},
        data={"question": "what colour is the circle", "top_k": "2", "attention": "1"},
    ).json()
    probabilities = [a["probability"] for a in out["answers"]]
    assert len(out["answers"]) == 2 and probabilities == sorted(probabilities, reverse=True)
    assert len(out["attention"]) == len(out["tokens"]) == 5


@pytest.mark.parametrize(
    "request_kwargs, status, message",
    [
        ({"files": {"image": ("a.txt", b"not an image", "text/plain")}}, 415, "not an image"),
        ({"json": {"image_base64": "***"}}, 422, "not base64"),
        ({"content": b"raw", "headers": {"content-type": "text/plain"}}, 415, "multipart"),
        ({"json": {}}, 422, "exactly one 'image'"),
        ({"json": ["a list"]}, 422, "must be an object"),
    ],
)
def test_bad_requests_get_clear_json_errors(captioner, request_kwargs, status, message):
    response = captioner.post("/v1/caption", **request_kwargs)
    assert response.status_code == status and message in response.json()["error"]


def test_bad_fields_oversized_images_and_wrong_tasks(captioner, answerer):
    image = {"image": ("a.png", png(), "image/png")}
    response = captioner.post("/v1/caption", files=image, data={"beam_size": "zero"})
    assert response.status_code == 422 and "beam_size" in response.json()["error"]
    response = captioner.post("/v1/caption", files=image, data={"beam_size": "0"})
    assert response.status_code == 422 and "at least 1" in response.json()["error"]
    response = captioner.post("/v1/caption", files=image, data={"beam_size": "1000000000"})
    assert response.status_code == 422 and "at most 8" in response.json()["error"]  # no OOM
    response = captioner.post("/v1/ask", files=image, data={"question": "what?"})
    assert response.status_code == 422 and "'caption' model" in response.json()["error"]
    response = answerer.post("/v1/ask", files=image)
    assert response.status_code == 422 and "question" in response.json()["error"]
    small = ServeSettings(max_image_bytes=2000, max_image_pixels=64 * 64)
    with TestClient(create_app(pipeline("caption"), small)) as client:
        big = {"image": ("big.png", png(size=(100, 100)), "image/png")}
        response = client.post("/v1/caption", files=big)
        assert response.status_code == 413 and "pixels" in response.json()["error"]
        pixels = torch.randint(0, 256, (40, 40, 3), generator=torch.Generator().manual_seed(0))
        noisy = Image.fromarray(pixels.to(torch.uint8).numpy())  # noise: ~5 kB as PNG
        buffer = io.BytesIO()
        noisy.save(buffer, format="PNG")
        response = client.post("/v1/caption", files={"image": ("n.png", buffer.getvalue())})
        assert response.status_code == 413 and "bytes" in response.json()["error"]


def test_concurrent_requests_share_batches_and_get_their_own_answers(answerer):
    colours = [(255, 0, 0), (0, 0, 255), (0, 255, 0), (250, 250, 250)] * 4
    results = [None] * len(colours)

    def ask(i):
        files = {"image": ("a.png", png(colours[i]), "image/png")}
        results[i] = answerer.post("/v1/ask", files=files, data={"question": "what colour"}).json()

    before = answerer.get("/v1/model").json()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(colours))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = answerer.get("/v1/model").json()
    assert after["batches"] - before["batches"] < len(colours)  # some requests were batched
    pipe = pipeline("vqa")
    for i, colour in enumerate(colours):  # each got the answer to its own image
        expected = pipe.ask(Image.new("RGB", (32, 32), colour), "what colour", top_k=1)[0]
        assert results[i]["answers"][0]["answer"] == expected[0]
        assert results[i]["answers"][0]["probability"] == pytest.approx(expected[1], abs=1e-5)


def test_micro_batcher_groups_waits_and_refuses_when_full():
    calls = []

    def run(group, payloads):
        calls.append((group, list(payloads)))
        return [p * 10 for p in payloads]

    async def scenario():
        batcher = MicroBatcher(run, max_batch=3, max_wait_ms=50, max_queue=4)
        jobs = [batcher.submit("x" if i % 2 else "y", i) for i in range(4)]
        results = await asyncio.gather(*jobs)
        busy = None
        try:
            await asyncio.gather(*(batcher.submit("x", i) for i in range(6)))
        except Busy as error:
            busy = error
        await batcher.close()
        return results, busy

    results, busy = asyncio.run(scenario())
    assert results == [0, 10, 20, 30]
    assert {tuple(p) for g, p in calls[:2]} == {(0, 2), (1, 3)}  # one batch per group
    assert busy is not None


@pytest.mark.parametrize("threads", [1, 2])
def test_batches_run_on_one_inference_thread_with_its_torch_threads(threads):
    """Not the event loop's thread, always the same one, with `threads` PyTorch threads (the
    caller's own setting untouched)."""
    import threading

    def run(group, payloads):
        return [(threading.get_ident(), torch.get_num_threads()) for _ in payloads]

    async def scenario():
        batcher = MicroBatcher(run, max_batch=2, max_wait_ms=1, threads=threads)
        seen = [await batcher.submit("x", i) for i in range(3)]
        await batcher.close()
        return seen

    before = torch.get_num_threads()
    seen = asyncio.run(scenario())
    assert len(set(seen)) == 1 and seen[0][0] != threading.get_ident()
    assert seen[0][1] == threads and torch.get_num_threads() == before


def test_retrieval_endpoints(tmp_path):
    with TestClient(create_app(pipeline("retrieval"))) as client:
        image = {"image": ("a.png", png(), "image/png")}
        out = client.post("/v1/retrieve", files=image, data={"texts": "a red circle,a blue square"})
        assert out.status_code == 200 and len(out.json()["results"]) == 2
        images = [
            ("images", (f"{i}.png", png(c), "image/png"))
            for i, c in enumerate([(255, 0, 0), (0, 0, 255)])
        ]
        out = client.post(
            "/v1/retrieve", files=images, data={"query": "a red circle", "top_k": "1"}
        )
        assert out.status_code == 200 and len(out.json()["results"]) == 1
        out = client.post(
            "/v1/classify",
            json={
                "image_base64": base64.b64encode(png()).decode(),
                "labels": ["red", "blue"],
                "template": "a {} circle",
            },
        )
        probabilities = [label["probability"] for label in out.json()["labels"]]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
        for template in ("x", "{} {}", "{x}{}", "{", "{0}"):  # one {} and nothing else
            refused = client.post(
                "/v1/classify", files=image, data={"labels": "red", "template": template}
            )
            assert refused.status_code == 422 and "template" in refused.json()["error"], template


def test_retrieval_and_classify_share_the_bounded_queue():
    """Every endpoint's calls wait in one queue of `max_queue`: classify requests beyond it get
    503 + Retry-After, and each is run alone (its own candidates), one model call at a time."""
    pipe = pipeline("retrieval")
    release, running, most = threading.Event(), [0], [0]
    real = pipe.classify

    def slow_classify(*args):
        running[0] += 1
        most[0] = max(most[0], running[0])
        release.wait(10)
        running[0] -= 1
        return real(*args)

    pipe.classify = slow_classify
    settings = ServeSettings(max_batch=8, max_wait_ms=5, max_queue=2)
    statuses, answers = [], []
    with TestClient(create_app(pipe, settings)) as client:

        def classify():
            files = {"image": ("a.png", png(), "image/png")}
            answer = client.post("/v1/classify", files=files, data={"labels": "red,blue"})
            statuses.append(answer.status_code)
            answers.append(answer)

        threads = [threading.Thread(target=classify) for _ in range(6)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while statuses.count(503) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)  # one running, two waiting: the other three are turned away
        release.set()
        for thread in threads:
            thread.join()
    assert sorted(statuses) == [200, 200, 200, 503, 503, 503], statuses
    assert all(a.headers["Retry-After"] for a in answers if a.status_code == 503)
    assert most[0] == 1  # never two model calls at once


@pytest.mark.parametrize("kind", ["multipart/form-data; boundary=b", "application/json"])
def test_a_client_that_leaves_mid_body_is_no_server_error(kind):
    """Starlette's ClientDisconnect once reached the catch-all 500 handler, which re-raises:
    uvicorn logged a traceback for every client that dropped an upload."""
    body = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + png()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/caption",
        "raw_path": b"/v1/caption",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", kind.encode()), (b"content-length", b"100000")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    messages = [{"type": "http.request", "body": body[:40], "more_body": True}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(create_app(pipeline("caption"))(scope, receive, send))  # raises nothing
    assert sent[0]["status"] == 400
