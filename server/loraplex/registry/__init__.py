"""Adapters: reading and validating PEFT files, and the LRU device slots they are served from."""
