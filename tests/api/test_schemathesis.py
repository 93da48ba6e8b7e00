"""Property-based fuzzing of the whole OpenAPI (schemathesis): no input, valid or not, may cause a 5xx.

Examples are bounded (``MAX_EXAMPLES`` per operation, derandomised so a run is repeatable) to keep this to a
minute or two on 2 cores; the operations run against the real Postgres and S3 with a real API key, so requests
get past authentication and reach the services and the database.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 30


class _Deferred:
    """The ASGI app schemathesis calls: the schema is read at import (from an app that never starts), the
    requests go to the test stack's app once the ``client`` fixture has started it."""

    def __init__(self) -> None:
        from services.api.app import create_app

        self.app: Any = create_app(check_schema=False)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


_target = _Deferred()
schema = schemathesis.openapi.from_asgi("/openapi.json", _target)


@pytest.fixture(scope="module")
def key_headers(stack) -> dict[str, str]:
    from tests.conftest import new_project_key

    _, token = new_project_key("fuzz")
    return {"Authorization": f"Bearer {token}"}


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_input_causes_a_server_error(case, client, key_headers):
    _target.app = client.app
    response = case.call(headers=key_headers)
    case.validate_response(response, checks=[not_a_server_error])


def test_fuzzing_is_not_vacuous():
    """The schema covers every route, so a green run means every operation was fuzzed."""
    paths = set(schema.raw_schema["paths"])
    assert {"/v1/jobs", "/v1/jobs/{job_id}/events", "/v1/datasets", "/v1/datasets/{dataset}",
            "/v1/artifacts", "/v1/experiments"} <= paths
