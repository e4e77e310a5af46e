"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis 4) on a real server at 127.0.0.1: valid and
invalid bodies for every operation; no answer may be a 5xx, and every error has OpenAI's shape. Bounded and
deterministic (a fixed number of examples per operation), so CI's budget holds."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from server_helpers import RunningServer

EXAMPLES = 30  # per operation and mode
OPERATIONS = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/documents"),
              ("GET", "/v1/documents"), ("DELETE", "/v1/documents/{doc_id}"), ("GET", "/v1/models"),
              ("GET", "/health"), ("GET", "/metrics")]


@pytest.fixture(scope="module")
def fuzz_server(tiny_params, tmp_path_factory):
    srv = RunningServer(tiny_params, store_dir=tmp_path_factory.mktemp("store"), overrides=["serve.max_new_tokens=4"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


def test_the_schema_lists_every_operation_we_fuzz(api):
    listed = {(op.ok().method.upper(), op.ok().path) for op in api.get_all_operations()}
    assert listed == set(OPERATIONS)


WITH_INPUT = [op for op in OPERATIONS if op[0] == "POST"]  # a body to get wrong (a path string cannot be)


@pytest.mark.parametrize("method,path,mode", [(*op, GenerationMode.POSITIVE) for op in OPERATIONS]
                         + [(*op, GenerationMode.NEGATIVE) for op in WITH_INPUT],
                         ids=lambda v: v.value if isinstance(v, GenerationMode) else v)
def test_no_request_gets_a_5xx_and_errors_have_our_shape(api, fuzz_server, method, path, mode):
    """Schemathesis' pytest plugin does not load under this pytest (9.x); its strategies drive hypothesis here."""

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
              database=None)
    @given(case=api[path][method].as_strategy(generation_mode=mode))
    def check(case):
        response = case.call(base_url=fuzz_server.url, timeout=60)
        assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text[:500]

    check()
