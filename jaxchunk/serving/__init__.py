"""Serving: a continuous-batching engine with chunked prefill, paged KV and per-slot states."""

from jaxchunk.serving.engine import Engine, EngineConfig, RequestOutput, StreamEvent
from jaxchunk.serving.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "RequestOutput", "SamplingParams", "StreamEvent"]
