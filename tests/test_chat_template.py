"""Chat templates are tenants' code: they render in sandbox processes with bounded time, memory and
output, exactly as transformers renders them, and every hostile one becomes a typed error that
names the problem, never a 500, a hung thread or a dead server.
"""

import os
import re
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from jinja2 import TemplateError
from transformers.utils.chat_template_utils import _compile_jinja_template

from live_server import LiveServer, server_config, upload
from loraplex.api.chat_template import MAX_TEMPLATE_CHARS, ChatTemplateRenderer
from loraplex.api.template_sandbox import sandbox_environment
from loraplex.errors import AdapterInvalid, EngineFailed, QueueFull, RequestInvalid

TIMEOUT = 1.0  # seconds; the hostile renderer's budget per render
LIVE_TIMEOUT = 3.0  # seconds; the live server's, long enough to probe the server while a render spins
MAX_OUTPUT = 10_000  # characters; the hostile renderer's output bound
SLACK = 3.0  # seconds a bounded failure may take past its bound on a loaded test machine
SPIN = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{- bos_token }}{% for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% if not loop.last %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
ALTERNATING = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
TOJSON = "{% for m in messages %}{{ m | tojson }}\n{{ m['content'] | tojson(indent=2) }}\n{% endfor %}{{ tools | tojson }}"
SYSTEM = """\
{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0]['content'] %}
    {% set loop_messages = messages[1:] %}
{% else %}
    {% set system = 'You are a helpful assistant.' %}
    {% set loop_messages = messages %}
{% endif %}
<<SYS>>{{ system }}<</SYS>>
{% for message in loop_messages %}
    {% if message['role'] == 'user' %}
[USER] {{ message['content'] }}
    {% else %}
[BOT] {% generation %}{{ message['content'] }}{% endgeneration %}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}[BOT]{% endif %}
"""
FEATURES = """\
{%- set ns = namespace(users=0) -%}
{%- for m in messages -%}
    {%- if m['role'] == 'system' %}{% continue %}{% endif -%}
    {%- set ns.users = ns.users + (1 if m['role'] == 'user' else 0) -%}
    {{ m['role'] | upper }}#{{ loop.index }}: {{ m['content'] }}
    {% if loop.index > 4 %}{% break %}{% endif %}
{% endfor -%}
users={{ ns.users }} tools={{ tools is none }} documents={{ documents is defined }} pad={{ pad_token }}
{{- dict(a=1) | tojson }} year={{ strftime_now('%Y') | length }} unk=[{{ unk_token }}]
{%- if add_generation_prompt %} >{% endif %}
"""
REALISTIC = {"chatml": CHATML, "llama3": LLAMA3, "alternating": ALTERNATING, "tojson": TOJSON, "system": SYSTEM, "features": FEATURES}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello there"}],
    "system-user": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  What is 2 + 2?  "}],
    "turns": [
        {"role": "user", "content": "héllo ✓ \"quoted\" <b>"},
        {"role": "assistant", "content": "Hi!\nHow can I help?"},
        {"role": "user", "content": "Tell me a joke"},
    ],
    "bad-role": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}],
}


@pytest.fixture(scope="module")
def renderer():
    renderer = ChatTemplateRenderer(timeout=TIMEOUT, max_output_chars=MAX_OUTPUT, workers=2)
    yield renderer
    renderer.close()


@pytest.fixture(scope="module")
def faithful():
    """A renderer with the server's default output bound, for comparing against transformers."""
    renderer = ChatTemplateRenderer(timeout=5.0, workers=1)
    yield renderer
    renderer.close()


def transformers_render(tokenizer, template, messages, add_generation_prompt) -> str | TemplateError:
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except TemplateError as exc:
        return exc


# --- the same text as transformers ----------------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("template", ["tiny-tokenizer", *REALISTIC])
def test_renders_what_apply_chat_template_renders(faithful, tokenizer, template, conversation, add_generation_prompt):
    text = tokenizer.chat_template if template == "tiny-tokenizer" else REALISTIC[template]
    messages = CONVERSATIONS[conversation]
    expected = transformers_render(tokenizer, text, messages, add_generation_prompt)
    if isinstance(expected, TemplateError):  # the template refuses the conversation: so must we, saying why
        with pytest.raises(RequestInvalid, match=re.escape(str(expected))):
            faithful.render(text, messages, add_generation_prompt, tokenizer.special_tokens_map)
    else:
        assert faithful.render(text, messages, add_generation_prompt, tokenizer.special_tokens_map) == expected


def test_the_sandbox_environment_is_configured_as_transformers_configures_its_own():
    ours, theirs = sandbox_environment(MAX_OUTPUT), _compile_jinja_template("x").environment
    assert set(ours.globals) == set(theirs.globals)
    assert set(ours.filters) == set(theirs.filters)
    assert set(ours.tests) == set(theirs.tests)
    assert {tag for ext in ours.extensions.values() for tag in ext.tags} == {
        tag for ext in theirs.extensions.values() for tag in ext.tags
    }
    options = ("trim_blocks", "lstrip_blocks", "keep_trailing_newline", "autoescape", "undefined", "finalize", "newline_sequence")
    assert {name: getattr(ours, name) for name in options} == {name: getattr(theirs, name) for name in options}
    assert isinstance(ours, type(theirs))


def test_keys_set_to_none_are_dropped_as_transformers_drops_them(faithful, tokenizer):
    template = "{% for m in messages %}{{ m['name'] is defined }}{% endfor %}"
    messages = [{"role": "user", "content": "hi", "name": None}]
    expected = transformers_render(tokenizer, template, messages, False)
    assert faithful.render(template, messages, False, tokenizer.special_tokens_map) == expected == "False"


# --- hostile templates ----------------------------------------------------------------------------

USER = [{"role": "user", "content": "hi"}]
HOSTILE = {
    "division-by-zero": ("{{ 1/0 }}", "ZeroDivisionError on line 1: division by zero"),
    "type-error": ("hello\n{{ 1 + messages[0]['content'] }}", "TypeError on line 2"),
    "undefined-variable-call": ("{{ nothing.here() }}", "UndefinedError on line 1: 'nothing' is undefined"),
    "undefined-method-call": ("{{ messages[0]['content'].no_such_method() }}", "UndefinedError on line 1: 'str object' has no attribute"),
    "nested-loops": (SPIN, f"took longer than {TIMEOUT:g} s"),
    "string-repetition": ("{{ 'x' * 10**9 }}", "'*' would build a value of 1000000000 items"),
    "list-repetition": ("{{ (range(100000) | list) * 100000 }}", "'*' would build a value of 10000000000 items"),
    "string-concatenation": ("{% set s = 'x' * 9000 %}{{ s + s }}", "'+' would build a value of 18000 items"),
    "huge-power": ("{{ 2 ** 100000000 }}", "'**' would build an integer"),
    "doubling": (
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        ("MemoryError", "took longer than"),  # whichever comes first: a GiB is slow to fill on a busy machine
    ),
    "output-over-the-limit": ("{% for i in range(100000) %}0123456789{% endfor %}", f"longer than {MAX_OUTPUT} characters"),
    "macro-recursion": ("{% macro down(n) %}{{ down(n + 1) }}{% endmacro %}{{ down(0) }}", "RecursionError"),
    "syntax-error": ("hello\n{% for m in messages %}{{ m }}", "syntax error on line 2"),
    "unknown-tag": ("{% frobnicate %}", "syntax error on line 1: Encountered unknown tag 'frobnicate'"),
    "class-mro": ("{{ ''.__class__.__mro__ }}", "SecurityError on line 1: access to attribute '__class__'"),
    "function-globals": ("{{ cycler.__init__.__globals__ }}", "SecurityError on line 1: access to attribute '__init__'"),
    "mutating-the-messages": ("{{ messages.append(1) }}", "SecurityError"),
    "underscore-namespace-attribute": ("{% set ns = namespace(_x=1) %}", "SecurityError"),
    "raise-exception": ("{{ raise_exception('system messages are not supported') }}", "system messages are not supported"),
    "template-too-long": ("x" * (MAX_TEMPLATE_CHARS + 1), f"over {MAX_TEMPLATE_CHARS} characters"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_template_is_a_request_error_naming_the_problem_in_bounded_time(renderer, case):
    template, problems = HOSTILE[case]
    started = time.monotonic()
    with pytest.raises(RequestInvalid) as raised:
        renderer.render(template, USER, True, {"bos_token": "<s>"})
    assert any(problem in str(raised.value) for problem in ([problems] if isinstance(problems, str) else problems))
    assert raised.value.param == "messages"
    assert time.monotonic() - started < TIMEOUT + SLACK


def test_a_render_that_times_out_takes_about_the_timeout_and_the_next_render_works(renderer):
    started = time.monotonic()
    with pytest.raises(RequestInvalid, match="took longer than"):
        renderer.render(SPIN, USER, True, {})
    assert TIMEOUT <= time.monotonic() - started < TIMEOUT + SLACK
    started = time.monotonic()
    assert renderer.render("{{ messages[0]['content'] }}!", USER, True, {}) == "hi!"
    assert time.monotonic() - started < SLACK


def sandbox_pids() -> set[int]:
    """The pids of this process's sandbox workers (Linux /proc)."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == os.getpid() and b"template_worker" in (stat.parent / "cmdline").read_bytes():
                pids.add(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue  # it exited as we looked
    return pids


def start_one_worker() -> tuple[ChatTemplateRenderer, int]:
    before = sandbox_pids()
    single = ChatTemplateRenderer(timeout=TIMEOUT, max_output_chars=MAX_OUTPUT, workers=1)
    assert single.render("ok", USER, False, {}) == "ok"
    (pid,) = sandbox_pids() - before
    return single, pid


def test_a_worker_that_stops_answering_is_killed_at_the_deadline_and_replaced():
    single, pid = start_one_worker()
    try:
        os.kill(pid, signal.SIGSTOP)  # deaf even to its own alarm: only the server's deadline can end it
        started = time.monotonic()
        with pytest.raises(RequestInvalid, match="took longer than"):
            single.render("ok", USER, False, {})
        assert time.monotonic() - started < TIMEOUT + SLACK
        assert pid not in sandbox_pids()
        assert single.render("again", USER, False, {}) == "again"
    finally:
        single.close()


def test_a_worker_that_dies_mid_render_is_a_clean_error_and_is_replaced():
    single, pid = start_one_worker()
    try:
        threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()
        with pytest.raises(RequestInvalid, match="died: it was killed by signal 9"):
            single.render(SPIN, USER, False, {})
        assert single.render("again", USER, False, {}) == "again"
    finally:
        single.close()


def test_a_worker_that_died_while_idle_is_replaced_before_it_is_used():
    single, pid = start_one_worker()
    try:
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        assert single.render("again", USER, False, {}) == "again"
    finally:
        single.close()


# --- concurrency ----------------------------------------------------------------------------------


def test_concurrent_renders_complete_correctly_while_a_hostile_one_times_out():
    pool_renderer = ChatTemplateRenderer(timeout=TIMEOUT, max_output_chars=MAX_OUTPUT, workers=3)
    conversations = [[{"role": "user", "content": f"message {i}"}] for i in range(12)]

    def render(i):
        return pool_renderer.render(CHATML, conversations[i], True, {})

    try:
        with ThreadPoolExecutor(max_workers=6) as threads:
            hostile = threads.submit(pool_renderer.render, SPIN, USER, True, {})
            texts = list(threads.map(render, range(len(conversations))))
            with pytest.raises(RequestInvalid, match="took longer than"):
                hostile.result()
    finally:
        pool_renderer.close()
    assert texts == [f"<|im_start|>user\nmessage {i}<|im_end|>\n<|im_start|>assistant\n" for i in range(len(conversations))]


def test_a_render_waits_for_a_busy_worker_and_the_wait_is_not_charged_to_it():
    single = ChatTemplateRenderer(timeout=TIMEOUT, max_output_chars=MAX_OUTPUT, workers=1)
    try:
        with ThreadPoolExecutor(max_workers=1) as threads:
            hostile = threads.submit(single.render, SPIN, USER, True, {})
            time.sleep(0.2)  # the hostile render holds the only worker
            assert single.render("{{ 'waited' }}", USER, True, {}) == "waited"
            with pytest.raises(RequestInvalid, match="took longer than"):
                hostile.result()
    finally:
        single.close()


def test_a_render_that_waits_too_long_for_a_worker_is_told_to_retry():
    single = ChatTemplateRenderer(timeout=TIMEOUT, max_output_chars=MAX_OUTPUT, workers=1, max_wait=0.3)
    try:
        with ThreadPoolExecutor(max_workers=1) as threads:
            hostile = threads.submit(single.render, SPIN, USER, True, {})
            time.sleep(0.2)
            started = time.monotonic()
            with pytest.raises(QueueFull, match="retry later"):
                single.render("ok", USER, True, {})
            assert time.monotonic() - started < 0.3 + SLACK
            with pytest.raises(RequestInvalid):
                hostile.result()
    finally:
        single.close()


def test_a_sandbox_that_cannot_start_is_the_servers_failure_not_the_callers(monkeypatch):
    unstartable = ChatTemplateRenderer(timeout=TIMEOUT, max_output_chars=MAX_OUTPUT, workers=1)
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    with pytest.raises(EngineFailed, match="the chat template sandbox cannot start"):
        unstartable.render("ok", USER, False, {})
    monkeypatch.undo()
    try:
        assert unstartable.render("ok", USER, False, {}) == "ok"  # the failed start freed its place in the pool
    finally:
        unstartable.close()


def test_close_stops_the_workers_and_a_later_render_starts_new_ones():
    single, pid = start_one_worker()
    single.close()
    time.sleep(0.1)
    assert pid not in sandbox_pids()
    try:
        assert single.render("back", USER, False, {}) == "back"
    finally:
        single.close()


# --- checking a template at upload ----------------------------------------------------------------

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}
REFUSED_AT_UPLOAD = {
    "syntax-error": ("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}", "syntax error on line 2"),
    "times-out": (SPIN, f"took longer than {TIMEOUT:g} s"),
    "output-over-the-limit": ("{% for i in range(100000) %}{{ messages }}{% endfor %}", f"longer than {MAX_OUTPUT} characters"),
    "runtime-error": ("{{ messages[0]['content'] / 2 }}", "TypeError on line 1"),
    "refuses-a-plain-conversation": ("{{ raise_exception('only one turn') }}", "only one turn"),
    "renders-nothing": ("{# nothing #}", "renders nothing"),
    "too-long": ("x" * (MAX_TEMPLATE_CHARS + 1), f"over {MAX_TEMPLATE_CHARS} characters"),
}


@pytest.mark.parametrize("case", REFUSED_AT_UPLOAD)
def test_check_refuses_a_template_that_cannot_be_served(renderer, case):
    template, problem = REFUSED_AT_UPLOAD[case]
    with pytest.raises(AdapterInvalid) as raised:
        renderer.check(template, SPECIAL)
    assert problem in str(raised.value)
    assert raised.value.param == "chat_template"


@pytest.mark.parametrize("template", [CHATML, LLAMA3, ALTERNATING, SYSTEM, FEATURES, "{{ bos_token + messages[0]['content'] }}"])
def test_check_accepts_a_serviceable_template(renderer, template):
    renderer.check(template, SPECIAL)


# --- a live server --------------------------------------------------------------------------------

# Serviceable on a plain conversation (so an upload-time check passes it), hostile on demand.
SPIN_ON_DEMAND = "{% if messages[-1]['content'] == 'spin' %}" + SPIN + "{% endif %}" + CHATML


def test_a_hostile_template_costs_its_caller_a_400_and_nobody_else_anything(llama, tmp_path):
    config = server_config(llama.model_dir, tmp_path / "store").model_copy(update={"chat_template_timeout": LIVE_TIMEOUT})
    with LiveServer(config) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        assert upload(client, "spinner", llama.adapter_dirs["r4-qv"], chat_template=SPIN_ON_DEMAND).status_code == 201

        def chat(model: str, content: str) -> httpx.Response:
            body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 2}
            return client.post("/v1/chat/completions", json=body)

        with ThreadPoolExecutor(max_workers=1) as threads:
            started = time.monotonic()
            hostile = threads.submit(chat, "spinner", "spin")
            time.sleep(0.3)
            health_seconds = []
            for _ in range(3):
                probe = time.monotonic()
                assert client.get("/health").status_code == 200
                health_seconds.append(time.monotonic() - probe)
            assert chat("tiny-base", "hello").status_code == 200
            assert not hostile.done()  # all of the above happened while the template was spinning
            answer = hostile.result()
        assert time.monotonic() - started < LIVE_TIMEOUT + SLACK
    assert answer.status_code == 400
    assert f"took longer than {LIVE_TIMEOUT:g} s" in answer.json()["error"]["message"]
    assert answer.json()["error"]["param"] == "messages"
    assert sorted(health_seconds)[1] < 0.1, health_seconds  # the median: a loaded machine may deschedule one probe
