"""What the OpenAPI document needs to know about one running server.

Owns: `ServedFacts`, read once from a `Services` when the document is first built: the served
model's name, context and vocabulary, the queue bound, whether there are API keys, and the body
limits. It must not build any part of the document.
"""

from dataclasses import dataclass

from loraplex.api.services import Services


@dataclass(frozen=True)
class ServedFacts:
    """What the document needs to know about one running server."""

    model_name: str
    max_model_len: int
    vocab_size: int
    max_prompt_chars: int
    max_queue: int | None
    api_keys: bool
    protect_metrics: bool
    max_request_bytes: int
    max_adapter_bytes: int

    @classmethod
    def of(cls, svc: Services) -> "ServedFacts":
        config = svc.config
        return cls(
            model_name=svc.model_name,
            max_model_len=svc.engine.max_model_len,
            vocab_size=svc.engine.vocab_size,
            max_prompt_chars=svc.prompts.max_chars,
            max_queue=svc.engine.config.max_queue,
            api_keys=not svc.keys.open_access,
            protect_metrics=config.metrics_auth == "key",
            max_request_bytes=config.max_request_bytes,
            max_adapter_bytes=config.max_adapter_bytes,
        )

    def within_queue(self, bound: int) -> int:
        """`bound`, or the queue's size where that is smaller (more choices could never run)."""
        return bound if self.max_queue is None else min(bound, self.max_queue)
