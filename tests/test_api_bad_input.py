"""Bad input over HTTP: every invalid request gets a 4xx in OpenAI's error shape that names what is
wrong, never a 500, and the server keeps serving afterwards.

One live server (max_model_len=64) serves the whole module; bad requests change nothing in it.
"""

import re
from dataclasses import dataclass, field

import httpx
import openai
import pytest

from live_server import LiveServer, server_config

MAX_MODEL_LEN = 64
BASE = "tiny-base"
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
ROUTES = (COMPLETIONS, CHAT)
GOOD_BODIES = {
    COMPLETIONS: {"model": BASE, "prompt": "hello", "max_tokens": 4},
    CHAT: {"model": BASE, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4},
}
UNCHECKED = object()  # the server sets no `param` for this case, so there is nothing to compare


@dataclass(frozen=True)
class BadInput:
    """One invalid request: a raw body, or fields laid over the route's good body.

    Args:
        id: the case's name in the test ids.
        fields: fields to set on the route's good body (ignored when `raw` is given).
        raw: the exact bytes to send instead of a JSON object.
        keyword: a word the error message must contain (the field or the problem), case-insensitive.
        param: the expected OpenAI `param`, or UNCHECKED.
    """

    id: str
    fields: dict = field(default_factory=dict)
    raw: bytes | None = None
    keyword: str = ""
    param: object = UNCHECKED

    def send(self, client: httpx.Client, route: str) -> httpx.Response:
        if self.raw is not None:
            return client.post(route, content=self.raw, headers={"content-type": "application/json"})
        return client.post(route, json={**GOOD_BODIES[route], **self.fields})


# Invalid on both routes, for the same reason.
SHARED = [
    BadInput("malformed-json", raw=b'{"model": "tiny-base", "prompt": ', keyword="JSON", param=None),
    BadInput("body-is-a-list", raw=b'[{"model": "tiny-base"}]', keyword="object", param=None),
    BadInput("unknown-field", {"frobnicate": True}, keyword="frobnicate", param="frobnicate"),
    BadInput("max-tokens-a-string", {"max_tokens": "5"}, keyword="max_tokens", param="max_tokens"),
    BadInput("temperature-a-string", {"temperature": "0.5"}, keyword="temperature", param="temperature"),
    BadInput("max-tokens-negative", {"max_tokens": -1}, keyword="max_tokens", param="max_tokens"),
    BadInput("temperature-negative", {"temperature": -1}, keyword="temperature", param="temperature"),
    BadInput("temperature-above-2", {"temperature": 3}, keyword="temperature", param="temperature"),
    BadInput("top-p-zero", {"top_p": 0}, keyword="top_p", param="top_p"),
    BadInput("top-p-above-1", {"top_p": 1.5}, keyword="top_p", param="top_p"),
    BadInput("n-zero", {"n": 0}, keyword="n", param="n"),
    BadInput("stop-empty-string", {"stop": ""}, keyword="stop", param="stop"),
    BadInput("stop-list-with-empty-string", {"stop": ["\n", ""]}, keyword="stop", param="stop"),
    BadInput("presence-penalty-above-2", {"presence_penalty": 3}, keyword="presence_penalty", param="presence_penalty"),
    BadInput("prompt-logprobs-above-20", {"prompt_logprobs": 21}, keyword="prompt_logprobs", param="prompt_logprobs"),
    BadInput("prompt-logprobs-negative", {"prompt_logprobs": -1}, keyword="prompt_logprobs", param="prompt_logprobs"),
    BadInput("prompt-logprobs-with-stream", {"prompt_logprobs": 1, "stream": True}, keyword="stream", param="prompt_logprobs"),
    BadInput(
        "stream-options-without-stream",
        {"stream_options": {"include_usage": True}},
        keyword="stream_options",
        param="stream_options",
    ),
]

COMPLETION_ONLY = [
    BadInput("prompt-a-number", {"prompt": 5}, keyword="prompt", param="prompt"),
    BadInput("prompt-text-too-long", {"prompt": "hello world " * 40}, keyword="context length", param="prompt"),
    BadInput("prompt-ids-too-long", {"prompt": [5] * 100}, keyword="context length", param="prompt"),
    BadInput("prompt-plus-max-tokens-too-long", {"prompt": [5] * 30, "max_tokens": 40}, keyword="max_tokens", param="max_tokens"),
    BadInput("max-tokens-zero-without-echo", {"max_tokens": 0}, keyword="echo", param="max_tokens"),
    BadInput("logprobs-above-20", {"logprobs": 21}, keyword="logprobs", param="logprobs"),
    BadInput("logprobs-negative", {"logprobs": -1}, keyword="logprobs", param="logprobs"),
    BadInput("prompt-empty-string", {"prompt": ""}, keyword="empty", param="prompt"),
    BadInput("prompt-empty-token-list", {"prompt": []}, keyword="prompt", param="prompt"),
    BadInput("prompt-token-id-past-vocab", {"prompt": [10**6]}, keyword="token"),
    BadInput("prompt-token-id-negative", {"prompt": [-1]}, keyword="prompt", param="prompt"),
]

CHAT_ONLY = [
    BadInput("messages-not-a-list", {"messages": "hello"}, keyword="messages", param="messages"),
    BadInput("messages-empty", {"messages": []}, keyword="messages", param="messages"),
    BadInput("message-role-unknown", {"messages": [{"role": "wizard", "content": "hi"}]}, keyword="role", param="messages.0.role"),
    BadInput(
        "messages-too-long",
        {"messages": [{"role": "user", "content": "hello world " * 40}]},
        keyword="context length",
        param="messages",
    ),
    BadInput("messages-plus-max-tokens-too-long", {"max_tokens": 60}, keyword="max_tokens", param="max_tokens"),
    BadInput("max-tokens-zero", {"max_tokens": 0}, keyword="max_tokens", param="max_tokens"),
    BadInput("top-logprobs-above-20", {"logprobs": True, "top_logprobs": 21}, keyword="top_logprobs", param="top_logprobs"),
]

TABLE = (
    [pytest.param(route, case, id=f"{route.rsplit('/', 1)[-1]}-{case.id}") for route in ROUTES for case in SHARED]
    + [pytest.param(COMPLETIONS, case, id=f"completions-{case.id}") for case in COMPLETION_ONLY]
    + [pytest.param(CHAT, case, id=f"chat-{case.id}") for case in CHAT_ONLY]
)


@pytest.fixture(scope="module")
def server(llama, tmp_path_factory):
    config = server_config(llama.model_dir, tmp_path_factory.mktemp("adapters"), max_model_len=MAX_MODEL_LEN)
    with LiveServer(config) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=httpx.Timeout(30)) as http:
        yield http


@pytest.fixture(scope="module")
def sdk(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30) as client:
        yield client


def openai_error(response: httpx.Response, status: int) -> dict:
    """The `error` object of `response`, after checking its status and OpenAI's error shape."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    return error


@pytest.mark.parametrize(("route", "case"), TABLE)
def test_invalid_request_gets_400_naming_the_problem(client, route, case):
    error = openai_error(case.send(client, route), 400)

    assert error["type"] == "invalid_request_error"
    assert re.search(rf"\b{re.escape(case.keyword)}\b", error["message"], re.IGNORECASE), error
    if case.param is not UNCHECKED:
        assert error["param"] == case.param, error


@pytest.mark.parametrize("route", ROUTES)
def test_unknown_model_gets_404_model_not_found(client, route):
    error = openai_error(client.post(route, json={**GOOD_BODIES[route], "model": "no-such-adapter"}), 404)

    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "no-such-adapter" in error["message"]


def test_openai_sdk_raises_bad_request_with_the_param(sdk):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.completions.create(model=BASE, prompt="hello", max_tokens=4, temperature=3)

    assert caught.value.status_code == 400
    assert caught.value.param == "temperature"
    assert caught.value.type == "invalid_request_error"


def test_openai_sdk_raises_not_found_for_an_unknown_model(sdk):
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.chat.completions.create(model="no-such-adapter", messages=[{"role": "user", "content": "hi"}], max_tokens=4)

    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"


@pytest.mark.parametrize("route", ROUTES)
def test_get_on_a_post_route_gets_405_in_openai_error_shape(client, route):
    response = client.get(route)

    openai_error(response, 405)
    assert response.headers["allow"] == "POST"


def test_unknown_route_gets_404_in_openai_error_shape(client):
    error = openai_error(client.get("/v1/no-such-route"), 404)

    assert error["type"] == "not_found_error"


def test_server_keeps_serving_after_every_bad_request(client):
    for route, case in ((p.values[0], p.values[1]) for p in TABLE):
        assert case.send(client, route).status_code < 500, (route, case.id)

    assert client.get("/health").status_code == 200
    completion = client.post(COMPLETIONS, json={**GOOD_BODIES[COMPLETIONS], "ignore_eos": True})
    assert completion.status_code == 200, completion.text
    assert completion.json()["usage"]["completion_tokens"] == 4
    chat = client.post(CHAT, json={**GOOD_BODIES[CHAT], "ignore_eos": True})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["finish_reason"] == "length"
