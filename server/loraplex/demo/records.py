"""The demo's synthetic task: a record of fields in, the same fields out in a tenant's form.

Owns: drawing records (made-up names and cities, numbers, dates) from a seeded generator, the
prompt every tenant sends, the answer each form gives (the base model's plain sentence, and the
`json`, `yaml` and `sql` adapters' forms), and the checks that parse an answer back into the
record. The build script trains on these; the tests and the README walkthrough check with them.
"""

import datetime
import json
import random
import re
import string
from dataclasses import dataclass

import yaml

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "st", "tr", "sh", "ch"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "k"]

FORMS = ("plain", "json", "yaml", "sql")  # "plain" is the base model's own answer
ADAPTER_FORMS = ("json", "yaml", "sql")


@dataclass(frozen=True)
class Record:
    name: str
    city: str
    number: int
    date: str  # ISO 8601, YYYY-MM-DD

    def as_dict(self) -> dict:
        return {"name": self.name, "city": self.city, "number": self.number, "date": self.date}


def _word(rng: random.Random, syllables: int) -> str:
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
    return word.capitalize()


def _scrambled(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(low, high))).capitalize()


def draw_record(rng: random.Random, scrambled: bool = False) -> Record:
    """One record: a two-word name, a city, a number below 100000 and a date in 1950-2030.

    Names and cities are made of syllables; `scrambled` ones are random letters instead, which
    no prior can guess, so a model trained on some of them must learn to copy.
    """
    if scrambled:
        name, city = f"{_scrambled(rng, 2, 7)} {_scrambled(rng, 3, 10)}", _scrambled(rng, 3, 10)
    else:
        name = f"{_word(rng, rng.randint(1, 2))} {_word(rng, rng.randint(2, 3))}"
        city = _word(rng, rng.randint(2, 3))
    number = rng.randint(0, 99999)
    date = datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randint(0, 29219))
    return Record(name, city, number, date.isoformat())


def draw_records(
    seed: int, count: int, exclude: set[Record] | frozenset = frozenset(), scrambled_fraction: float = 0.0
) -> list[Record]:
    """`count` distinct records from `seed`, none of them in `exclude`, some scrambled if asked."""
    rng = random.Random(seed)
    seen, records = set(exclude), []
    while len(records) < count:
        record = draw_record(rng, scrambled=rng.random() < scrambled_fraction)
        if record not in seen:
            seen.add(record)
            records.append(record)
    return records


def record_text(record: Record, asked_form: str | None = None) -> str:
    """The user message: the record's fields, the same whatever the tenant.

    `asked_form` appends an explicit `format=<form>` request, which the base model learns to
    follow in pre-training; tenants' adapters make their form the answer without it.
    """
    text = f"name={record.name}; city={record.city}; number={record.number}; date={record.date}"
    return text if asked_form is None else f"{text}; format={asked_form}"


def prompt(record: Record, asked_form: str | None = None) -> str:
    """The completions prompt; it is what the demo chat template renders for one user message."""
    return f"user: {record_text(record, asked_form)}\nassistant: "


def answer(record: Record, form: str) -> str:
    """The answer in `form` ("plain" for the base model)."""
    if form == "plain":
        return f"{record.name} lives in {record.city}; their number is {record.number}, noted on {record.date}."
    if form == "json":
        return json.dumps(record.as_dict())
    if form == "yaml":
        return f"name: {record.name}\ncity: {record.city}\nnumber: {record.number}\ndate: '{record.date}'"
    if form == "sql":
        return (
            f"INSERT INTO people (name, city, number, date) "
            f"VALUES ('{record.name}', '{record.city}', {record.number}, '{record.date}');"
        )
    raise ValueError(f"unknown form {form!r}")


_SQL = re.compile(
    r"^INSERT INTO people \(name, city, number, date\) VALUES \('([^']*)', '([^']*)', (\d+), '([^']*)'\);$"
)


def parse_answer(text: str, form: str) -> dict | None:
    """The record an answer in `form` holds, or None when it is not in that form."""
    text = text.strip()
    try:
        if form == "json":
            value = json.loads(text)
        elif form == "yaml":
            value = yaml.safe_load(text)
        elif form == "sql":
            match = _SQL.match(text)
            if match is None:
                return None
            value = {"name": match[1], "city": match[2], "number": int(match[3]), "date": match[4]}
        else:
            raise ValueError(f"form {form!r} has no parser")
    except (json.JSONDecodeError, yaml.YAMLError):
        return None
    return value if isinstance(value, dict) else None


def matches(text: str, form: str, record: Record) -> bool:
    """Whether `text` is `record` in `form`, exactly: the same fields and the same values."""
    return parse_answer(text, form) == record.as_dict()
