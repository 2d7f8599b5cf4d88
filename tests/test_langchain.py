"""langchain-openai against a live server, as its users drive an OpenAI-compatible one: `ChatOpenAI`
with `base_url`, `bind_tools`, and `with_structured_output` by function calling, JSON schema and
JSON mode. The tiny random model's free text is noise, so every case is one loraplex constrains
(a named or required tool choice, a response format): its answer must parse into what was asked.
"""

from typing import Literal

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from live_server import LiveServer, server_config

QUESTION = "What is the weather in Paris for the next three days?"


class Forecast(BaseModel):
    """A weather forecast request."""

    city: Literal["Paris", "London"]
    days: int = Field(ge=1, le=7)


@tool
def get_weather(city: Literal["Paris", "London"], days: int) -> str:
    """The weather in a city for some days."""
    return f"sun in {city} for {days} days"


@tool
def ping() -> str:
    """Is anyone there?"""
    return "pong"


@pytest.fixture(scope="module")
def server(llama, tmp_path_factory):
    with LiveServer(server_config(llama.model_dir, tmp_path_factory.mktemp("store"), max_model_len=1024)) as live:
        yield live


@pytest.fixture(scope="module")
def chat(server) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=server.url + "/v1", api_key="unused", model="tiny-base", temperature=0, max_tokens=300, max_retries=0
    )


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_with_structured_output_gives_the_pydantic_object(chat, method):
    forecast = chat.with_structured_output(Forecast, method=method).invoke(QUESTION)
    assert isinstance(forecast, Forecast)


def test_with_structured_output_json_mode_gives_a_json_object(chat):
    answer = chat.with_structured_output(None, method="json_mode").invoke(QUESTION + " Answer in JSON.")
    assert isinstance(answer, dict)


def test_with_structured_output_include_raw_keeps_the_tool_call(chat):
    result = chat.with_structured_output(Forecast, method="function_calling", include_raw=True).invoke(QUESTION)
    assert result["parsing_error"] is None
    assert result["raw"].tool_calls[0]["name"] == "Forecast"
    assert Forecast(**result["raw"].tool_calls[0]["args"]) == result["parsed"]


def test_bind_tools_with_a_named_choice_calls_that_tool(chat):
    message = chat.bind_tools([get_weather, ping], tool_choice="get_weather", parallel_tool_calls=False).invoke(QUESTION)
    assert isinstance(message, AIMessage) and not message.invalid_tool_calls
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    assert get_weather.invoke(call["args"]).startswith("sun in ")
    assert message.response_metadata["finish_reason"] == "tool_calls"


def test_bind_tools_required_calls_one_of_them_and_the_result_can_be_sent_back(chat):
    bound = chat.bind_tools([get_weather, ping], tool_choice="required", parallel_tool_calls=False)
    first = bound.invoke([HumanMessage(QUESTION)])
    (call,) = first.tool_calls
    assert call["name"] in ("get_weather", "ping")
    result = {"get_weather": get_weather, "ping": ping}[call["name"]].invoke(call["args"])
    history = [HumanMessage(QUESTION), first, ToolMessage(result, tool_call_id=call["id"])]
    second = bound.invoke(history)
    assert second.tool_calls and not second.invalid_tool_calls


def test_bind_tools_streams_tool_call_chunks_that_join_into_the_call(chat):
    bound = chat.bind_tools([get_weather], tool_choice="get_weather", parallel_tool_calls=False)
    chunks = list(bound.stream(QUESTION))
    joined = chunks[0]
    for chunk in chunks[1:]:
        joined += chunk
    (call,) = joined.tool_calls
    assert call["name"] == "get_weather"
    assert call == {**bound.invoke(QUESTION).tool_calls[0], "id": call["id"]}
