"""The request side of the OpenAPI document: each body's rules beyond its pydantic model.

Owns: `bound_requests`, which writes this server's limits into the request schemas (max_tokens
and token-id prompts from max_model_len, text prompts from the longest text that can fit, token
ids from the vocabulary, choices from --max-queue, adapter names other than the base model's)
and the rules between fields a schema can state (`if`/`then`: stream_options needs stream,
continuous_usage_stats needs include_usage, prompt_logprobs needs stream false, max_tokens 0 needs echo,
top_logprobs needs logprobs,
tool_choice required or named needs tools, only assistant messages carry tool_calls, density and
rank by merge method; `oneOf`: a prompt or messages to tokenize); rules no
schema can state (a text's length in tokens, best_of equal to n, one weight per adapter, an
adapter's contents) are written in descriptions. And `upload_form`, the multipart body of
`POST /v1/adapters`. It must not change what the server accepts: every bound here is one the
server enforces with a 400.
"""

from loraplex.api.schemas import MAX_N, MAX_PROMPTS
from loraplex.api.served_facts import ServedFacts
from loraplex.merging import DENSITY_METHODS
from loraplex.service.store import NAME_PATTERN


def _integer(prop: dict) -> dict:
    """The integer branch of a property (`int | None` is an anyOf)."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == "integer":
            return branch
    raise ValueError(f"no integer branch in {prop}")


def _describe(prop: dict, text: str) -> None:
    prop["description"] = text


def _require_when(schema: dict, condition: dict, requirement: dict, present: bool = True) -> None:
    """Add `if condition then requirement` (each a map from a property to its schema) to an object schema.

    `present` False lets the required properties be absent too (an absent field is its default, null).
    """
    then = {"required": list(requirement), "properties": requirement} if present else {"properties": requirement}
    schema.setdefault("allOf", []).append({"if": {"required": list(condition), "properties": condition}, "then": then})


def bound_requests(schemas: dict, facts: ServedFacts) -> None:
    """Write this server's limits and the rules of each request body into the component `schemas`."""
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        _bound_sampling(schemas[name], facts)
    _bound_completion(schemas["CompletionRequest"], facts)
    _bound_chat(schemas["ChatCompletionRequest"], facts)
    _require_when(schemas["ChatMessage"], {"role": {"not": {"const": "assistant"}}}, {"tool_calls": {"type": "null"}}, present=False)
    _require_when(
        schemas["StreamOptions"], {"continuous_usage_stats": {"const": True}}, {"include_usage": {"const": True}}
    )
    _bound_adapter_requests(schemas, facts)
    _bound_tokenizer_requests(schemas, facts)


def _model(facts: ServedFacts) -> str:
    return (
        f"`{facts.model_name}` (the base model) or the name of an adapter the caller may use "
        "(GET /v1/models); any other name is a 404."
    )


def _bound_sampling(request: dict, facts: ServedFacts) -> None:
    """What completions and chat share."""
    queue = f" ({facts.max_queue}, --max-queue)" if facts.max_queue is not None else ""
    model = _model(facts)
    choices = f"Choices per prompt; the request's prompts x n must be at most the server's queue{queue}, or it is a 400."
    props = request["properties"]
    _describe(props["model"], model)
    _integer(props["n"])["maximum"] = facts.within_queue(MAX_N)
    _describe(props["n"], choices)
    _require_when(request, {"stream_options": {"type": "object"}}, {"stream": {"const": True}})
    _describe(props["stream_options"], "Only with stream true.")
    _require_when(request, {"prompt_logprobs": {"type": "integer"}}, {"stream": {"const": False}}, present=False)
    _describe(
        props["prompt_logprobs"],
        "vLLM's: each prompt token's logprob, rank and this many best alternatives, from the second token on. Not with "
        "stream true.",
    )
    _describe(props["presence_penalty"], "Subtracted once from the logit of every token generated so far (OpenAI's).")
    _describe(props["frequency_penalty"], "Subtracted from each token's logit once per time it was generated (OpenAI's).")
    _describe(
        props["logit_bias"],
        f"Token id (below the vocabulary size, {facts.vocab_size}) to a bias added to its logit; at most 300 entries.",
    )


def _bound_completion(completion: dict, facts: ServedFacts) -> None:
    last_token, longest_prompt = facts.vocab_size - 1, facts.max_model_len - 1
    props = completion["properties"]
    for branch in props["prompt"]["anyOf"]:
        items = branch.get("items", {})
        if items.get("type") == "integer":  # one prompt of token ids
            items["maximum"] = last_token
            branch["maxItems"] = longest_prompt
        elif items.get("type") == "array":  # several prompts of token ids
            items["items"]["maximum"] = last_token
            items["maxItems"] = longest_prompt
            branch["maxItems"] = facts.within_queue(MAX_PROMPTS)
        elif items.get("type") == "string":  # several text prompts
            items["maxLength"] = facts.max_prompt_chars
            branch["maxItems"] = facts.within_queue(MAX_PROMPTS)
        elif branch.get("type") == "string":  # one text prompt
            branch["maxLength"] = facts.max_prompt_chars
    _describe(
        props["prompt"],
        f"Text, token ids (each below the vocabulary size, {facts.vocab_size}), or a list of either. Every prompt "
        f"must be shorter than max_model_len ({facts.max_model_len}) tokens and leave room for max_tokens: a text "
        "prompt's length in tokens depends on the tokenizer, which no schema can state (a 400 names the count); "
        f"text longer than {facts.max_prompt_chars} characters (max_model_len tokens of the vocabulary's longest) "
        "cannot fit and is refused before it is tokenized.",
    )
    _integer(props["max_tokens"])["maximum"] = longest_prompt
    _describe(
        props["max_tokens"],
        f"The longest prompt's tokens plus max_tokens must be at most max_model_len ({facts.max_model_len}), "
        "or it is a 400. 0 only with echo true (scores the prompt). Null: whatever the context leaves.",
    )
    _require_when(completion, {"max_tokens": {"const": 0}}, {"echo": {"const": True}})
    _integer(props["best_of"])["maximum"] = facts.within_queue(MAX_N)
    _describe(props["best_of"], "Only best_of equal to n is supported (a rule between two fields no schema states).")
    _describe(props["suffix"], "Not supported: only null or the empty string is accepted.")


def _bound_chat(chat: dict, facts: ServedFacts) -> None:
    props = chat["properties"]
    _describe(
        props["messages"],
        "Rendered through the adapter's chat template, else the base model's. The rendered prompt must be shorter "
        f"than max_model_len ({facts.max_model_len}) tokens and leave room for max_tokens; its length depends on "
        "the template and the tokenizer, which no schema can state (a 400 names the count).",
    )
    for name in ("max_tokens", "max_completion_tokens"):
        _integer(props[name])["maximum"] = facts.max_model_len - 1
        _describe(
            props[name],
            f"The rendered prompt's tokens plus this must be at most max_model_len ({facts.max_model_len}), "
            "or it is a 400. max_completion_tokens wins when both are given; null: whatever the context leaves.",
        )
    _require_when(chat, {"top_logprobs": {"type": "integer"}}, {"logprobs": {"const": True}})
    _describe(props["top_logprobs"], "Only with logprobs true.")
    forcing = {"tool_choice": {"anyOf": [{"const": "required"}, {"type": "object"}]}}
    _require_when(chat, forcing, {"tools": {"type": "array", "minItems": 1}})
    _describe(
        props["tool_choice"],
        "auto (the default with tools), none, required, or a named function, which must be one of tools (a rule "
        "between two fields no schema states: a 400 otherwise). required and a named function need tools, and "
        "constrain the output to calls: each allowed function's parameters must be a schema the grammar library "
        "can enforce (a 400 naming tool_choice says which keyword it cannot).",
    )


def _bound_adapter_requests(schemas: dict, facts: ServedFacts) -> None:
    adapter_name = _adapter_name(facts)
    merge = schemas["MergeRequest"]
    props = merge["properties"]
    props["name"].update(adapter_name)
    _describe(props["adapters"], "Names of adapters the caller owns (admins: any adapter); an unknown one is a 404.")
    _describe(
        props["weights"],
        "One weight per adapter, in order (a rule between two fields no schema states). Whether the adapters can "
        "be merged at all (targets, ranks, shapes) depends on their contents: a 400 or 422 says why not.",
    )
    density_methods = list(DENSITY_METHODS)
    _require_when(merge, {"method": {"enum": density_methods}}, {"density": {"type": "number"}})
    _require_when(merge, {"method": {"not": {"enum": density_methods}}}, {"density": {"type": "null"}}, present=False)
    _describe(props["density"], f"Required by {', '.join(density_methods)}; null for the others.")
    _require_when(merge, {"method": {"not": {"const": "svd"}}}, {"rank": {"type": "null"}}, present=False)
    _describe(props["rank"], "svd only: the merged rank (default: the largest source rank).")

    load = schemas["LoadLoraRequest"]["properties"]
    load["lora_name"].update(adapter_name)
    load["lora_path"]["pattern"] = "^[^\\u0000]*$"
    _describe(
        load["lora_path"],
        "A PEFT adapter directory inside the server's --lora-roots (default: its adapter store); one outside is a "
        "403, a missing one a 404. Its files are validated against the base model: 400 or 422 says what is wrong.",
    )
    unload = schemas["UnloadLoraRequest"]["properties"]
    _describe(
        unload["lora_name"],
        "An adapter loaded with /v1/load_lora_adapter; one from the adapter store is a 400 (DELETE it instead).",
    )


def _bound_tokenizer_requests(schemas: dict, facts: ServedFacts) -> None:
    """vLLM's /tokenize (one of a prompt or messages) and /detokenize."""
    tokenize = schemas["TokenizeRequest"]
    props = tokenize["properties"]
    _describe(props["model"], f"{_model(facts)} Null or absent: the base model.")
    text = next(branch for branch in props["prompt"]["anyOf"] if branch.get("type") == "string")
    text["maxLength"] = facts.max_prompt_chars
    within = (
        f"must come to at most max_model_len ({facts.max_model_len}) tokens, which depends on the tokenizer and no "
        "schema can state (a 400 names the count)"
    )
    _describe(props["prompt"], f"Text to tokenize (vLLM's completions form); it {within}.")
    _describe(props["messages"], f"A chat to render and tokenize (vLLM's chat form); the rendered prompt {within}.")
    _describe(props["add_special_tokens"], "Default: true with prompt, false with messages (the template adds them).")
    tokenize["oneOf"] = [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
    ]
    detokenize = schemas["DetokenizeRequest"]["properties"]
    _describe(detokenize["model"], f"{_model(facts)} Null or absent: the base model.")
    detokenize["tokens"]["maxItems"] = facts.max_model_len
    detokenize["tokens"]["items"]["maximum"] = facts.vocab_size - 1
    _describe(detokenize["tokens"], f"At most max_model_len ({facts.max_model_len}) ids, each below the vocabulary size.")


def _adapter_name(facts: ServedFacts, forbid_base: bool = True) -> dict:
    not_base = {"not": {"const": facts.model_name}} if forbid_base else {}
    return {
        "pattern": NAME_PATTERN.pattern,
        **not_base,
        "description": f"1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit; not "
        f"`{facts.model_name}`, the base model's name.",
    }


def upload_form(facts: ServedFacts) -> dict:
    """The multipart/form-data body of `POST /v1/adapters` (read by hand in adapters.py, so FastAPI cannot see it)."""
    flag = {"type": "string", "pattern": "^([Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee]|[01])$"}
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name", "config", "weights"],
                    "properties": {
                        # `not` (the base model's name) is left to the description here: schemathesis
                        # 4.32 cannot check a `not` against a form holding binary parts.
                        "name": {"type": "string", **_adapter_name(facts, forbid_base=False)},
                        "config": {
                            "type": "object",
                            "description": "adapter_config.json, as PEFT's save_pretrained writes it (a JSON part).",
                        },
                        "weights": {
                            "type": "string",
                            "format": "binary",
                            "description": f"adapter_model.safetensors, at most {facts.max_adapter_bytes} bytes "
                            "(--max-adapter-bytes). Its contents are validated against the base model beyond any "
                            "schema: unreadable files are a 400, ones that do not fit the base a 422.",
                        },
                        "chat_template": {"type": "string", "description": "A Jinja chat template for this adapter."},
                        "overwrite": {**flag, "description": "true to replace an adapter of that name (default false)."},
                        "shared": {**flag, "description": "true for an adapter every tenant may use (admins only)."},
                    },
                },
                "encoding": {
                    "config": {"contentType": "application/json"},
                    "weights": {"contentType": "application/octet-stream"},
                    "chat_template": {"contentType": "text/plain"},
                },
            }
        },
    }
