"""An OpenAI-compatible HTTP server for radlads students and their teachers, with continuous
batching and a prefix-state cache (docs/serving.md)."""

from .app import create_app, load_engine, running, serve
from .config import ServeConfig

__all__ = ["ServeConfig", "create_app", "load_engine", "running", "serve"]
