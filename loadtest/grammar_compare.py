"""`python -m loadtest.grammar_compare`: llguidance against xgrammar for loraplex's structured outputs.

Owns: the comparison behind the choice of grammar library (README, BENCHMARKS.md): for each
library, on a byte-level BPE tokenizer of the tiny test vocabulary (256 tokens) and of the
benchmark shape (4,096 tokens, loadtest/structured_output.py's), the time to compile an app-like
JSON schema (cold, nothing cached), the mean time to compute one token mask along a seeded walk
through the grammar, and, for every JSON Schema keyword the issue lists, whether the library
enforces it (a valid instance accepted, an invalid one refused), refuses the schema, or silently
ignores the keyword (the invalid instance accepted). It needs both libraries installed (only
llguidance is a dependency of loraplex); it builds its tokenizers in a temporary directory and
writes nothing else.

    python -m loadtest.grammar_compare
"""

import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

WALK_STEPS = 64  # masks timed per walk
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 8},
        "address": {"$ref": "#/$defs/address"},
        "kind": {"enum": ["a", "b", "c"]},
    },
    "required": ["name", "age", "tags", "address", "kind"],
    "additionalProperties": False,
    "$defs": {
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        }
    },
}

# keyword: (schema, a valid instance, an invalid instance)
KEYWORD_CASES = {
    "type": ({"type": "integer"}, 3, "3"),
    "required": ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, {"a": 1}, {}),
    "enum": ({"enum": ["x", "y"]}, "x", "z"),
    "const": ({"const": "x"}, "x", "y"),
    "minimum": ({"type": "integer", "minimum": 5}, 7, 3),
    "maximum": ({"type": "integer", "maximum": 5}, 3, 7),
    "exclusiveMinimum": ({"type": "number", "exclusiveMinimum": 5}, 6, 5),
    "minLength": ({"type": "string", "minLength": 3}, "abc", "ab"),
    "maxLength": ({"type": "string", "maxLength": 3}, "abc", "abcd"),
    "pattern": ({"type": "string", "pattern": "^[0-9]{3}$"}, "123", "12a"),
    "format (date)": ({"type": "string", "format": "date"}, "2024-01-02", "hello"),
    "additionalProperties: false": (
        {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
        {"a": 1},
        {"a": 1, "b": 2},
    ),
    "minItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 2}, [1, 2], [1]),
    "maxItems": ({"type": "array", "items": {"type": "integer"}, "maxItems": 2}, [1, 2], [1, 2, 3]),
    "nested objects": (
        {
            "type": "object",
            "properties": {"o": {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"]}},
            "required": ["o"],
        },
        {"o": {"b": True}},
        {"o": {"b": 1}},
    ),
    "$ref/$defs": (
        {"type": "object", "properties": {"p": {"$ref": "#/$defs/p"}}, "required": ["p"], "$defs": {"p": {"type": "integer"}}},
        {"p": 1},
        {"p": "1"},
    ),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
    "multipleOf": ({"type": "integer", "multipleOf": 3}, 6, 7),
}


def byte_bpe(path: Path, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of `vocab_size` tokens trained on JSON-like text (every byte encodable)."""
    corpus = [json.dumps({"name": f"user{i}", "age": i % 97, "tags": ["x", "y"], "city": "Paris"}) for i in range(400)]
    corpus += [" ".join(f"word{i * j % 1000}" for j in range(30)) for i in range(200)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(path)
    return fast


class Llguidance:
    name = "llguidance"

    def __init__(self, hf_tokenizer):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.lib, self.masks = llguidance, llguidance.torch
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer)
        self.vocab = self.tokenizer.vocab_size

    def compile(self, schema: dict):
        grammar = self.lib.LLMatcher.grammar_from_json_schema(schema)
        is_error, messages = self.lib.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise ValueError(messages[0])
        matcher = self.lib.LLMatcher(self.tokenizer, grammar)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def walk(self, matcher, rng: random.Random) -> list[float]:
        bitmask = self.masks.allocate_token_bitmask(1, self.vocab)
        times = []
        for _ in range(WALK_STEPS):
            if matcher.is_stopped():
                break
            start = time.perf_counter()
            self.masks.fill_next_token_bitmask(matcher, bitmask, 0)
            times.append(time.perf_counter() - start)
            matcher.consume_token(rng.choice(allowed(bitmask, self.vocab)))
        return times

    def accepts(self, schema: dict, text: str) -> bool:
        matcher = self.compile(schema)
        return matcher.consume_tokens(self.tokenizer.tokenize_str(text)) and matcher.is_accepting()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, hf_tokenizer):
        import xgrammar

        self.lib = xgrammar
        self.vocab = len(hf_tokenizer)
        self.info = xgrammar.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=self.vocab)

    def compile(self, schema: dict):
        compiler = self.lib.GrammarCompiler(self.info, cache_enabled=False)
        return self.lib.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema)))

    def walk(self, matcher, rng: random.Random) -> list[float]:
        bitmask = self.lib.allocate_token_bitmask(1, self.vocab)
        times = []
        for _ in range(WALK_STEPS):
            if matcher.is_terminated():
                break
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            times.append(time.perf_counter() - start)
            matcher.accept_token(rng.choice(allowed(bitmask, self.vocab)))
        return times

    def accepts(self, schema: dict, text: str) -> bool:
        matcher = self.compile(schema)
        return matcher.accept_string(text) and matcher.is_completed()


def allowed(bitmask: torch.Tensor, vocab: int) -> list[int]:
    """The token ids whose bit is set in row 0 of an [1, ceil(V/32)] int32 bitmask."""
    bits = (bitmask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1  # [W, 32]
    return bits.flatten()[:vocab].nonzero().flatten().tolist()


def keyword_verdict(library, schema: dict, valid, invalid) -> str:
    try:
        good = library.accepts(schema, json.dumps(valid))
    except Exception as exc:
        return f"refused ({str(exc).splitlines()[0][:60]})"
    bad = library.accepts(schema, json.dumps(invalid))
    if good and not bad:
        return "enforced"
    return "IGNORED (invalid accepted)" if bad else "valid refused"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizers = {size: byte_bpe(Path(tmp) / str(size), size) for size in (256, 4096)}
        print("| library | vocab | compile ms (cold) | mask ms / token (mean, p90) |")
        print("|---|---|---|---|")
        for size, hf_tokenizer in tokenizers.items():
            for kind in (Llguidance, Xgrammar):
                library = kind(hf_tokenizer)
                compiles, masks = [], []
                for seed in range(5):
                    start = time.perf_counter()
                    matcher = library.compile(SCHEMA)
                    compiles.append(time.perf_counter() - start)
                    masks += library.walk(matcher, random.Random(seed))
                masks.sort()
                print(
                    f"| {library.name} | {size} | {1e3 * statistics.median(compiles):.2f} | "
                    f"{1e3 * statistics.mean(masks):.3f}, {1e3 * masks[int(0.9 * len(masks))]:.3f} |"
                )
        libraries = [Llguidance(tokenizers[256]), Xgrammar(tokenizers[256])]
        print("\n| keyword | " + " | ".join(lib.name for lib in libraries) + " |")
        print("|---|" + "---|" * len(libraries))
        for keyword, (schema, valid, invalid) in KEYWORD_CASES.items():
            print(f"| {keyword} | " + " | ".join(keyword_verdict(lib, schema, valid, invalid) for lib in libraries) + " |")


if __name__ == "__main__":
    main()
