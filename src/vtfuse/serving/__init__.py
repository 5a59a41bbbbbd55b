"""Serving: an HTTP API with micro-batching and a web page (`vtfuse serve`)."""

from vtfuse.serving.app import create_app
from vtfuse.serving.batching import Busy, MicroBatcher
from vtfuse.serving.requests import ServeSettings

__all__ = ["Busy", "MicroBatcher", "ServeSettings", "create_app"]
