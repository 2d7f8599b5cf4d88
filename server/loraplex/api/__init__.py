"""The HTTP layer: FastAPI routes over one engine and one adapter catalog."""
