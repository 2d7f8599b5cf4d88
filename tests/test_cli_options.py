"""Options derived from config fields: a field's name, type, default and description make its option.

A small model stands in for the configs, with one field of each kind they use; a one-command app
built from it is parsed by typer's test runner.
"""

from pathlib import Path
from typing import Any, Literal

import pytest
import typer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from typer.testing import CliRunner

from loraplex.cli_options import OptionError, build_config, field_option, field_options, with_options


class Sample(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="What to call it.")
    mode: Literal["fast", "slow"] = Field(default="fast", description="How to run.")
    batch_tokens: int = Field(default=512, ge=16, description="Tokens per step.")
    limit: int | None = Field(default=None, ge=1, description="At most this many (default: no limit).")
    ratio: float = Field(default=0.5, gt=0, le=1, description="Share kept.")
    store: Path = Field(default=Path("store"), description="Where it lives.")
    roots: tuple[Path, ...] = Field(default=(), description="Directories it may read.")
    verbose: bool = Field(default=False, description="Say more.")

    @model_validator(mode="after")
    def _check(self) -> "Sample":
        if self.mode == "slow" and self.limit is None:
            raise ValueError("slow mode needs a --limit")
        return self


def sample_app(**option_settings: Any) -> tuple[typer.Typer, list[Sample]]:
    """An app whose one command builds a `Sample` from its options; the configs built are collected."""
    app, built = typer.Typer(), []

    @app.command()
    @with_options(field_options(Sample, Sample.model_fields, **option_settings))
    def run(**options: Any) -> None:
        built.append(build_config(Sample, options))

    return app, built


def parse(*args: str, env: dict[str, str] | None = None, **option_settings: Any) -> Sample:
    app, built = sample_app(**option_settings)
    result = CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return built[0]


def help_lines(**option_settings: Any) -> dict[str, str]:
    """Each option's --help row, by flag."""
    app, _ = sample_app(**option_settings)
    output = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "300"}).output
    return {flag: line for line in output.splitlines() for flag in [line.strip("│ *").split(" ")[0]] if flag.startswith("--")}


def test_unset_options_take_the_models_defaults():
    assert parse("--name", "x") == Sample(name="x")


@pytest.mark.parametrize(
    ("args", "field", "value"),
    [
        (["--batch-tokens", "64"], "batch_tokens", 64),
        (["--mode", "slow", "--limit", "3"], "mode", "slow"),
        (["--limit", "3"], "limit", 3),
        (["--ratio", "0.25"], "ratio", 0.25),
        (["--store", "elsewhere"], "store", Path("elsewhere")),
        (["--roots", "a", "--roots", "b"], "roots", (Path("a"), Path("b"))),
        (["--verbose"], "verbose", True),
        (["--no-verbose"], "verbose", False),
    ],
)
def test_each_flag_is_the_field_name_and_parses_to_the_fields_type(args, field, value):
    assert getattr(parse("--name", "x", *args), field) == value


def test_help_shows_each_fields_description_and_default():
    lines = help_lines()
    assert "How to run." in lines["--mode"] and "[default: fast]" in lines["--mode"]
    assert "[default: 512]" in lines["--batch-tokens"] and "[default: store]" in lines["--store"]
    assert "(default: no limit)" in lines["--limit"] and "[default:" not in lines["--limit"]
    assert "<fast|slow>" in lines["--mode"]
    assert "--no-verbose" in lines["--verbose"]


def test_a_field_without_a_default_is_a_required_option():
    app, _ = sample_app()
    result = CliRunner().invoke(app, [])
    assert result.exit_code == 2 and "--name" in result.output


def test_a_value_outside_a_literal_is_refused_by_the_choice():
    app, _ = sample_app()
    result = CliRunner().invoke(app, ["--name", "x", "--mode", "medium"])
    assert result.exit_code == 2 and "--mode" in result.output


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"batch_tokens": 8}, "--batch-tokens 8: Input should be greater than or equal to 16"),
        ({"ratio": 0.0}, "--ratio 0.0: Input should be greater than 0"),
        ({"limit": 0}, "--limit 0: Input should be greater than or equal to 1"),
        ({"mode": "slow"}, "slow mode needs a --limit"),
    ],
)
def test_the_models_own_bounds_and_checks_refuse_naming_the_flag(values, message):
    with pytest.raises(OptionError) as refused:
        build_config(Sample, {"name": "x", **values})
    assert str(refused.value) == message


def test_every_refused_flag_is_named_one_per_line():
    with pytest.raises(OptionError) as refused:
        build_config(Sample, {"name": "x", "batch_tokens": 8, "limit": 0})
    assert str(refused.value).splitlines() == [
        "--batch-tokens 8: Input should be greater than or equal to 16",
        "--limit 0: Input should be greater than or equal to 1",
    ]


def test_with_an_env_prefix_each_option_reads_its_variable_and_help_names_it():
    env = {"SAMPLE_LIMIT": "3", "SAMPLE_ROOTS": "a:b", "SAMPLE_MODE": "slow"}
    sample = parse("--name", "x", env=env, env_prefix="SAMPLE_")
    assert (sample.limit, sample.roots, sample.mode) == (3, (Path("a"), Path("b")), "slow")
    assert "SAMPLE_BATCH_TOKENS" in help_lines(env_prefix="SAMPLE_")["--batch-tokens"]


def test_a_flag_beats_its_variable():
    assert parse("--name", "x", "--limit", "5", env={"SAMPLE_LIMIT": "3"}, env_prefix="SAMPLE_").limit == 5


def test_a_command_may_give_a_field_a_default_of_its_own_and_a_note():
    app, built = typer.Typer(), []

    @app.command()
    @with_options([field_option(Sample, "name", default=None, shown_default="the usual", note="Here: anything.")])
    def run(**options: Any) -> None:
        built.append(options)

    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "300"})
    assert "What to call it. Here: anything." in result.output and "(the usual)" in result.output
    assert CliRunner().invoke(app, []).exit_code == 0 and built == [{"name": None}]


def test_a_commands_own_parameters_come_before_the_derived_options():
    app, calls = typer.Typer(), []

    @app.command()
    @with_options(field_options(Sample, ("name", "limit")))
    def run(count: int = 1, **options: Any) -> None:
        calls.append((count, options))

    assert CliRunner().invoke(app, ["--count", "2", "--name", "x"]).exit_code == 0
    assert calls == [(2, {"name": "x", "limit": None})]
