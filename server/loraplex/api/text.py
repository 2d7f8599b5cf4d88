"""The string type of every request body: any text but what no tokenizer takes.

Owns: `Text` (a `str` field refusing lone surrogates, "\ud800" in JSON, which no tokenizer or UTF-8
encoder accepts) and `valid_unicode`, the check itself, for values built inside other validators.
Bounds on length are each field's own.
"""

from typing import Annotated

from pydantic import AfterValidator


def valid_unicode(text: str) -> str:
    """`text`, or a ValueError naming where its lone surrogate stands."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"is not valid Unicode: it holds a lone surrogate at character {exc.start}") from None
    return text


Text = Annotated[str, AfterValidator(valid_unicode)]
