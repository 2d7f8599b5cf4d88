"""The Jinja environment chat templates render in: transformers' own, on a bounded sandbox.

Owns: `sandbox_environment`, configured exactly as transformers' `apply_chat_template` configures
its environment (jinja's ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks, the
loopcontrols extension and the `{% generation %}` tag; the `tojson` filter; the `raise_exception`,
`strftime_now`, `dict` and `namespace` globals), so that every valid template renders the same
text; plus bounds on the values `+`, `*` and `**` may build, so the common memory bombs fail early
and by name. Must not: be used in the server's process to render a tenant's template (only the
sandbox worker renders; this module only builds the environment), or differ from transformers in
anything a valid template can see.
"""

import json
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_INT_BITS = 1 << 16  # the largest int `*` and `**` may build (str() refuses past 4300 digits anyway)


class TemplateRejected(TemplateError):
    """`raise_exception(message)`: the template refuses the conversation, on purpose."""


class ValueTooLarge(Exception):
    """An operation would build a value past the bound, or the output passed it."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers' AssistantTracker with tracking off."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller) -> str:
        return caller()


def _raise_exception(message):
    raise TemplateRejected(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: no HTML escaping, and json.dumps' options exposed
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    # transformers' `dict` global: the constructor and fromkeys, and no attribute to climb through
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # transformers' `namespace` global: no underscore-prefixed attributes
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}. "
                "Please rename the attribute."
            )


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja's immutable sandbox where `+`, `*` and `**` refuse to build values past a bound.

    Args:
        max_items: the longest str, list or tuple `+` and `*` may build.
    """

    intercepted_binops = frozenset(("+", "*", "**"))

    def __init__(self, max_items: int):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        self.max_items = max_items

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            self._check_repeat(left, right)
            self._check_repeat(right, left)
            if _is_int(left) and _is_int(right):
                self._check_bits(left.bit_length() + right.bit_length(), operator)
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                self._check_items(len(left) + len(right), operator)
        elif _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
            self._check_bits(left.bit_length() * right, operator)
        return super().call_binop(context, operator, left, right)

    def _check_repeat(self, sequence, count) -> None:
        if isinstance(sequence, (str, list, tuple)) and _is_int(count):
            self._check_items(len(sequence) * count, "*")

    def _check_items(self, items: int, operator: str) -> None:
        if items > self.max_items:
            raise ValueTooLarge(f"'{operator}' would build a value of {items} items; the limit is {self.max_items}")

    @staticmethod
    def _check_bits(bits: int, operator: str) -> None:
        if bits > MAX_INT_BITS:
            raise ValueTooLarge(f"'{operator}' would build an integer of about {bits} bits; the limit is {MAX_INT_BITS}")


def _is_int(value) -> bool:
    return isinstance(value, int)


def sandbox_environment(max_items: int) -> BoundedSandbox:
    """The environment templates render in: transformers' globals and filters on a bounded sandbox."""
    env = BoundedSandbox(max_items)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env
