"""PEFT baselines for the benchmarks: the model helpers and the small OpenAI-compatible servers over them."""
