"""Tokenizing tenants' text with bounded work.

Owns: `PromptEncoder`, which refuses, before tokenizing it, any text longer than the longest
text that could fit the context: `max_model_len` tokens of at most the vocabulary's longest token
each. Tokenizing is linear but slow (a 16 MiB prompt took 46 s on the 2-core machine, and it
would be refused afterwards anyway), so the bound is what keeps one request from costing a
minute of CPU. It must run off the event loop; the routes call it on the thread pool.
"""

from loraplex.errors import RequestInvalid


class PromptEncoder:
    """The tokenizer's `encode`, behind a bound on the text's length.

    Args:
        tokenizer: the base model's tokenizer.
        max_model_len: the engine's tokens per sequence.
    """

    def __init__(self, tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        longest_token = max((len(token) for token in tokenizer.get_vocab()), default=1)
        self.max_chars = max_model_len * max(longest_token, 1)

    def encode(self, text: str, param: str, where: str | None = None, add_special_tokens: bool = True) -> list[int]:
        """`text`'s token ids; raises RequestInvalid (naming `where`, default `param`) if it cannot fit."""
        if len(text) > self.max_chars:
            raise RequestInvalid(
                f"{where or param} has {len(text)} characters; no text longer than {self.max_chars} characters fits "
                "this model's maximum context length (max_model_len tokens of at most the vocabulary's longest token)",
                param=param,
            )
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
