"""A schema fuzz: schemathesis sends what the OpenAPI spec allows (and what it does not) to
every endpoint of a captioning and a VQA server; no request may end in a server error."""

from __future__ import annotations

from tests.helpers import require_module

schemathesis = require_module("schemathesis")
require_module("fastapi")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from tests.helpers import tiny_pipeline as pipeline  # noqa: E402
from vtfuse.serving import create_app  # noqa: E402

SCHEMAS = {
    task: schemathesis.openapi.from_asgi("/openapi.json", create_app(pipeline(task)))
    for task in ("caption", "vqa", "retrieval")
}


def _fuzz(schema):
    @schema.parametrize()
    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
    def test(case):
        case.call_and_validate(checks=[not_a_server_error])

    return test


test_caption_server = _fuzz(SCHEMAS["caption"])
test_vqa_server = _fuzz(SCHEMAS["vqa"])
test_retrieval_server = _fuzz(SCHEMAS["retrieval"])
