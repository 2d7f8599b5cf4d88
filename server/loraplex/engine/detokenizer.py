"""Incremental detokenization and stop strings, one request at a time.

Owns: turning each new token into the text it completes (holding back an unfinished multi-byte
character), and finding stop strings in the text so far, holding back any tail that could still
become one. The engine calls it after sampling; the scheduler and runner never see text.
"""

from dataclasses import dataclass


@dataclass
class TextDelta:
    text: str  # new text that may be emitted now
    stopped: bool  # a stop string was found; the text ends before it


class Detokenizer:
    """Decode one request's output as it grows.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt_ids: the prompt, whose last tokens give the first output token its context.
        stop: stop strings, if any.
        include_stop: keep the stop string that ended the text (vLLM's include_stop_str_in_output).
        skip_special_tokens: leave special tokens out of the text.
    """

    CONTEXT_TOKENS = 5

    def __init__(
        self,
        tokenizer,
        prompt_ids: list[int],
        stop: tuple[str, ...] = (),
        include_stop: bool = False,
        skip_special_tokens: bool = True,
    ):
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-self.CONTEXT_TOKENS :])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = stop
        self._include_stop = include_stop
        self._skip_special_tokens = skip_special_tokens
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all text decoded so far (truncated at a stop string)
        self._emitted = 0
        self._stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> TextDelta:
        """Feed one generated token; return what can be emitted now."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix_offset : self._read_offset])
        after = self._decode(self._ids[self._prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._advance(after[len(before) :])
        if self._find_stop():
            return TextDelta(self._take(len(self.text)), stopped=True)
        return TextDelta(self._take(len(self.text) - self._hold), stopped=False)

    def _advance(self, new_text: str) -> None:
        self.text += new_text
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)

    def _find_stop(self) -> bool:
        if not self._stop:
            return False
        search_from = max(0, self._emitted - self._hold)
        hits = [(i, i + len(s)) for s in self._stop if (i := self.text.find(s, search_from)) >= 0]
        if hits:
            start, end = min(hits)
            self.text = self.text[: end if self._include_stop else start]
            self._stopped = True
        return self._stopped

    def flush(self) -> str:
        """The held-back tail at the end of the request, an unfinished character decoded as U+FFFD
        (as `tokenizer.decode` of the whole output would); nothing after a stop string."""
        if self._stopped:
            return ""
        if self._read_offset < len(self._ids):
            before = self._decode(self._ids[self._prefix_offset : self._read_offset])
            self._advance(self._decode(self._ids[self._prefix_offset :])[len(before) :])
            self._find_stop()
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        delta = self.text[self._emitted : upto]
        self._emitted = upto
        return delta
