"""The bundled demo: a small base model and tenant adapters that each answer in their own form.

`DEMO_MODEL_DIR` is where the base model ships, as package data; its name is the served model id.
"""

from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).parent / "demo-base"
