"""Score the demo: how often each adapter answers held-out records exactly in its form.

Owns: running every held-out record through the serving engine for the base model and each
adapter, all in one mixed batch, greedy, and counting answers that parse back to the record in
each form. The build script reports these scores; the tests assert on them.
"""

from pathlib import Path

from loraplex.config import EngineConfig
from loraplex.demo.records import ADAPTER_FORMS, Record, matches, prompt
from loraplex.engine.engine import Engine
from loraplex.engine.request import SamplingParams

MAX_ANSWER_TOKENS = 96


def evaluate(model_dir: Path, adapter_dirs: dict[str, Path], records: list[Record]) -> dict[str, dict[str, float]]:
    """For the base model and each adapter: the fraction of answers that match each form.

    Returns:
        `{model: {form: fraction}}` where model is "base" or an adapter name.
    """
    engine = Engine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", max_loras=len(adapter_dirs),
                                 max_num_seqs=64, max_num_batched_tokens=2048))
    for name, path in adapter_dirs.items():
        engine.load_adapter(name, path)
    tokenizer = engine.base.tokenizer
    models = [None, *adapter_dirs]
    prompts, adapters = [], []
    for record in records:
        ids = tokenizer(prompt(record))["input_ids"]
        for model in models:
            prompts.append(ids)
            adapters.append(model)
    params = SamplingParams(max_tokens=MAX_ANSWER_TOKENS, temperature=0)
    completions = engine.generate(prompts, adapters, params)
    scores: dict[str, dict[str, float]] = {}
    for index, model in enumerate(models):
        texts = [c.text for c in completions[index :: len(models)]]
        scores[model or "base"] = {
            form: sum(matches(text, form, record) for text, record in zip(texts, records, strict=True)) / len(records)
            for form in ADAPTER_FORMS
        }
    return scores
