"""Generated input against our OpenAPI spec (schemathesis): no route answers 5xx, whatever it is sent.

The app runs without its worker: jobs accepted by POST /api/v1/jobs stay queued, which is all these
checks need. Left out: POST /sdapi/v1/txt2img and /sdapi/v1/img2img (they wait for the worker to finish
the job, so without one they never return) and the SSE stream /api/v1/jobs/{job_id}/events (it ends
only when its job does). Their bad-input paths are covered in test_a1111_api.py and test_server.py.

Each operation runs as its own hypothesis test inside one pytest test, rather than through
`schemathesis.pytest.from_fixture`: that lazy loader reads `Node._nodeid`, which pytest 9 removed
(schemathesis 4.32.5), and an eager schema would need the app at import time.
"""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from sdstudio.engine.requests import GenerationRequest
from sdstudio.server.app import create_app
from tests.conftest import make_settings

EXAMPLES = 15  # per operation and generation mode
EXCLUDED = {("POST", "/sdapi/v1/txt2img"), ("POST", "/sdapi/v1/img2img"), ("GET", "/api/v1/jobs/{job_id}/events")}


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, tiny_model):
    home = tmp_path_factory.mktemp("schemathesis")
    app = create_app(make_settings(home / "home", tiny_model.parent, default_model=str(tiny_model)),
                     home / "data", start_worker=False)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module")
def app(api_schema):
    return api_schema.app


def run_operation(operation, mode: GenerationMode) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        case.call_and_validate(checks=[not_a_server_error])

    check()


def test_no_route_answers_5xx_to_generated_input(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    tested = [op for op in operations if (op.method.upper(), op.path) not in EXCLUDED]
    assert len(tested) >= 15 and len(operations) - len(tested) == len(EXCLUDED)
    failures = []
    for operation in tested:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                run_operation(operation, mode)
            except Unsatisfiable:  # negative mode on a route with no input that can be made invalid
                assert mode is GenerationMode.NEGATIVE, f"{operation.method} {operation.path}: nothing generated"
            except Exception as e:  # collect every failing route, then report them together
                failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}): {e}")
    assert not failures, "\n\n".join(failures)


WRONG_TYPES = ("abc", "", 1.5, -1, 0, 10**30, True, None, [], [1], {"a": 1})


def test_every_request_field_of_the_wrong_type_is_a_4xx(app):
    """The spec types POST /api/v1/jobs's `request` as a free-form object, so schemathesis cannot reach
    its fields: send each GenerationRequest field every JSON type instead."""
    failures = []
    with TestClient(app, raise_server_exceptions=False) as client:
        for name in GenerationRequest.field_names():
            for value in WRONG_TYPES:
                response = client.post("/api/v1/jobs", json={"request": {"steps": 1, name: value}})
                if response.status_code >= 500:
                    failures.append(f"{name}={value!r}: {response.status_code} {response.text[:80]}")
    assert not failures, f"{len(failures)} request(s) answered 5xx:\n" + "\n".join(failures)
