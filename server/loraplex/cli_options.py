"""Command-line options derived from the config models' fields, so a default is written once.

Owns: turning one pydantic field into a typer option (`field_option`: the flag from the field's
name, help from its description, the default from its default, the type from its annotation, an
optional environment variable); giving a command function the signature typer builds its options
from (`with_options`); and building a config model from option values (`build_config`), so the
model's own bounds and checks are the ones enforced, with each refusal naming its flag.
It must not restate a field's default, bounds or description, nor read the environment itself
(click reads the variables each option names).
"""

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, TypeVar, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

Command = TypeVar("Command", bound=Callable[..., Any])
Config = TypeVar("Config", bound=BaseModel)
FROM_FIELD: Any = object()  # `field_option(default=...)` left as the field's own default


class OptionError(ValueError):
    """Option values a config model refused; the message names each flag, its value and the reason."""


def flag_of(name: str) -> str:
    """The flag of a field: `max_num_batched_tokens` -> `--max-num-batched-tokens`."""
    return "--" + name.replace("_", "-")


def _option_type(annotation: Any) -> Any:
    """The annotation typer parses: a `tuple[X, ...]` field becomes a repeatable `list[X]` option."""
    if get_origin(annotation) is tuple and get_args(annotation)[1:] == (Ellipsis,):
        return list[get_args(annotation)[0]]
    return annotation


def _option_default(field: FieldInfo) -> Any:
    if field.is_required():
        return inspect.Parameter.empty
    default = field.get_default(call_default_factory=True)
    return list(default) if isinstance(default, tuple) else default


def field_option(
    model: type[BaseModel],
    name: str,
    *,
    env_prefix: str | None = None,
    panel: str | None = None,
    default: Any = FROM_FIELD,
    shown_default: str | None = None,
    note: str = "",
) -> inspect.Parameter:
    """One field of `model` as a keyword parameter carrying its `typer.Option`.

    Args:
        model: the config model that owns the field.
        name: the field's name; the option's flag is `flag_of(name)`.
        env_prefix: read the option from the variable `env_prefix + NAME` too (e.g. `LORAPLEX_`).
        panel: the --help panel the option is listed in.
        default: a default of the command's own, for a field whose model default does not fit it
            (serve's --model takes the bundled demo); the field's default otherwise.
        shown_default: what --help shows as the default, where `default` is a stand-in (None).
        note: a sentence appended to the field's description, for what differs in this command.
    """
    field = model.model_fields[name]
    help_text = " ".join(filter(None, [field.description, note]))
    annotation = _option_type(field.annotation)
    repeated = get_args(annotation)[0] if get_origin(annotation) is list else None
    option = typer.Option(
        help=help_text,
        envvar=None if env_prefix is None else env_prefix + name.upper(),
        show_envvar=env_prefix is not None,
        show_default=True if shown_default is None else shown_default,
        rich_help_panel=panel,
        metavar=None if repeated is None else f"<{repeated.__name__.lower()}>",  # one value; the flag repeats
    )
    value = _option_default(field) if default is FROM_FIELD else default
    if value is None:
        annotation = annotation | None
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=value, annotation=Annotated[annotation, option])


def field_options(
    model: type[BaseModel], names: Iterable[str], *, env_prefix: str | None = None, panel: str | None = None
) -> list[inspect.Parameter]:
    """The fields `names` of `model`, in that order, each as `field_option` makes it."""
    return [field_option(model, name, env_prefix=env_prefix, panel=panel) for name in names]


def with_options(options: Iterable[inspect.Parameter]) -> Callable[[Command], Command]:
    """Decorate a command taking `**options`: typer lists its own parameters, then `options`.

    Typer builds a command's options from `inspect.signature`, which reads `__signature__`; the
    values of `options` arrive in the command's `**options`.
    """
    options = list(options)

    def apply(command: Command) -> Command:
        own = inspect.signature(command, eval_str=True).parameters.values()
        kept = [parameter for parameter in own if parameter.kind is not inspect.Parameter.VAR_KEYWORD]
        command.__signature__ = inspect.Signature([*kept, *options])
        return command

    return apply


def _describe(error: dict) -> str:
    reason = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:
        return reason
    return f"{flag_of(str(error['loc'][0]))} {error['input']}: {reason}"


def build_config(model: type[Config], values: Mapping[str, Any]) -> Config:
    """Validate option values with `model` itself; values left unset (None) take the model's default.

    Raises:
        OptionError: naming each refused flag with its value and the model's reason, one per line.
    """
    try:
        return model.model_validate({name: value for name, value in values.items() if value is not None})
    except ValidationError as exc:
        raise OptionError("\n".join(_describe(error) for error in exc.errors())) from None
