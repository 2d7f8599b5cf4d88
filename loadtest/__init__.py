"""Load and throughput benchmarks for loraplex, run as modules (`python -m loadtest.<name>`)."""
