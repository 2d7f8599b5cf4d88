"""The serving engine: base model, LoRA slots in the forward, KV cache, scheduler, sampler, step loop."""
