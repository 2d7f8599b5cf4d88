"""The bundled demo: each tenant's adapter answers held-out records in its own parsable form.

The held-out records are drawn with another seed than the training data and exclude every
training record, so names, cities and numbers are new to the model.
"""

import asyncio
import dataclasses
import shutil
from pathlib import Path

import httpx
import pytest

from live_server import LiveServer
from loraplex.config import EngineConfig, ServerConfig
from loraplex.demo import DEMO_MODEL_DIR as MODEL_DIR
from loraplex.demo.build import DemoRecipe, build
from loraplex.demo.evaluate import MAX_ANSWER_TOKENS, evaluate
from loraplex.demo.records import ADAPTER_FORMS, draw_records, matches, prompt

REPO = Path(__file__).resolve().parents[1]
ADAPTERS = REPO / "adapters"
# 100 records keep the per-adapter bar meaningful (an adapter right 90% of the time passes >= 0.95 with
# probability 0.06; with 200, 0.008) at half the engine time; the shipped adapters miss at most 1 of them.
HELD_OUT = 100
# Through the live server: every record to every adapter at once, one running batch of 90 requests.
SERVED = 30
SHIPPED_LIMIT = 25 * 1024 * 1024


@pytest.fixture(scope="module")
def held_out():
    recipe = DemoRecipe()
    training = set(draw_records(recipe.seed, recipe.train_records, scrambled_fraction=recipe.scrambled_fraction))
    return draw_records(recipe.held_out_seed + 1, HELD_OUT, exclude=training)


@pytest.fixture(scope="module")
def scores(held_out):
    return evaluate(MODEL_DIR, {form: ADAPTERS / form for form in ADAPTER_FORMS}, held_out)


@pytest.mark.parametrize("form", ADAPTER_FORMS)
def test_each_adapter_answers_held_out_records_in_its_form(scores, form):
    assert scores[form][form] >= 0.95, scores


@pytest.mark.parametrize("form", ADAPTER_FORMS)
def test_no_adapter_answers_in_another_adapters_form(scores, form):
    # JSON is a subset of YAML, so the json adapter's answers also parse as YAML: that pair is skipped.
    others = [other for other in ADAPTER_FORMS if other != form and (other, form) != ("json", "yaml")]
    assert all(scores[other][form] == 0 for other in others), scores


def test_the_base_model_answers_in_none_of_the_forms(scores):
    assert scores["base"] == {form: 0 for form in ADAPTER_FORMS}, scores


def watch_adapter_mix(engine) -> list[int]:
    """Record, after every engine step, how many distinct adapters its running sequences used."""
    mixes = [0]
    inner_step = engine.observer.step

    def step(num_seqs: int) -> None:
        mixes.append(len({r.adapter.name for r in engine.scheduler.running if r.adapter is not None}))
        inner_step(num_seqs)

    engine.observer.step = step
    return mixes


def test_held_out_records_through_a_live_server_in_one_mixed_batch(held_out, tmp_path):
    """Every record to every adapter at once: the engine mixes the three adapters in shared steps."""
    store = tmp_path / "adapters"
    shutil.copytree(ADAPTERS, store)
    records = held_out[:SERVED]
    engine = EngineConfig(model=str(MODEL_DIR), dtype="float32", device="cpu", max_loras=3, max_num_seqs=len(records) * len(ADAPTER_FORMS))
    jobs = [(record, form) for record in records for form in ADAPTER_FORMS]

    async def ask_all(url: str) -> list[str]:
        limits = httpx.Limits(max_connections=len(jobs))
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
            bodies = [
                {"model": form, "prompt": prompt(record), "max_tokens": MAX_ANSWER_TOKENS, "temperature": 0}
                for record, form in jobs
            ]
            responses = await asyncio.gather(*(client.post("/v1/completions", json=body) for body in bodies))
        return [response.json()["choices"][0]["text"] for response in responses]

    # On a server thread: the test watches the engine's scheduler step by step.
    with LiveServer(ServerConfig(engine=engine, adapters=store, engine_process=False)) as server:
        mixes = watch_adapter_mix(server.engine)
        texts = asyncio.run(ask_all(server.url))
    assert max(mixes) == len(ADAPTER_FORMS), "some step ran all three adapters together"
    for form in ADAPTER_FORMS:
        answers = [(text, record) for text, (record, asked) in zip(texts, jobs, strict=True) if asked == form]
        correct = sum(matches(text, form, record) for text, record in answers)
        assert correct / len(answers) >= 0.95, (form, correct, len(answers))


def test_shipped_files_are_at_most_25_mb():
    shipped = [*MODEL_DIR.rglob("*"), *ADAPTERS.rglob("*")]
    assert sum(path.stat().st_size for path in shipped if path.is_file()) <= SHIPPED_LIMIT


def test_the_build_is_deterministic(tmp_path):
    """The whole recipe, shrunk to a few steps, twice: byte-identical model, tokenizer and adapters.

    On one torch thread: on a shared machine the recipe's two OpenMP threads spin-wait for each
    other and the build took over 600 s (under 10 s alone).
    """
    recipe = dataclasses.replace(
        DemoRecipe(), train_records=300, held_out_records=4, base_steps=4, adapter_steps=2, batch_size=8, threads=1
    )
    outputs = []
    for run in ("first", "second"):
        build(recipe, tmp_path / run / "model", tmp_path / run / "adapters")
        outputs.append(tmp_path / run)
    first, second = outputs
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert any(p.name == "model.safetensors" for p in files) and any(p.name == "adapter_model.safetensors" for p in files)
    for relative in files:
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative


def test_serve_with_no_flags_serves_the_demo_base_and_the_adapters_store(tmp_path):
    """`loraplex serve` alone, run where ./adapters is the demo store, as the README walkthrough does."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from test_serve_process import STARTUP_SECONDS, free_port

    shutil.copytree(ADAPTERS, tmp_path / "adapters")
    port = free_port()
    env = {**os.environ, "LORAPLEX_PORT": str(port)}
    process = subprocess.Popen([sys.executable, "-m", "loraplex", "serve"], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "serve did not start"
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        ids = {model["id"]: model for model in models["data"]}
        assert set(ids) == {"demo-base", *ADAPTER_FORMS}
        assert all(ids[form]["parent"] == "demo-base" for form in ADAPTER_FORMS)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
