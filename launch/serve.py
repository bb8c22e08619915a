"""Serve a jaxchunk model over HTTP (OpenAI-style /v1/completions, streaming).

  python launch/serve.py --checkpoint /path/to/llama_folder --host 0.0.0.0 --port 8000
  python launch/serve.py --pattern rat,local --port 8000     # random-init byte model (smoke)

A Llama safetensors folder is served with a byte-level tokenizer only when its vocabulary is 256
(the byte models); other checkpoints need their own tokenizer, which this launcher does not load.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from jaxchunk.config import ModelConfig
from jaxchunk.models.language_model import LanguageModel
from jaxchunk.serving import Engine, EngineConfig
from jaxchunk.serving.hf import load_llama
from jaxchunk.serving.http import make_server
from jaxchunk.serving.tokenizer import ByteTokenizer


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, default=8000)
  parser.add_argument("--checkpoint", help="a Llama-style HF folder (config.json + safetensors)")
  parser.add_argument("--pattern", default="rat,local", help="layer pattern of a random byte model")
  parser.add_argument("--slots", type=int, default=8)
  parser.add_argument("--max-len", type=int, default=1024)
  parser.add_argument("--page-size", type=int, default=16)
  parser.add_argument("--chunk-size", type=int, default=64)
  parser.add_argument("--decode-steps", type=int, default=1,
                      help="decode tokens per slot per jitted call while nothing waits")
  parser.add_argument("--mixed-step-limit", type=float, default=None,
                      help="cap prefill pieces so a step that also decodes takes at most this "
                           "multiple of a decode step (timed at warm-up)")
  parser.add_argument("--dtype", default="float32")
  args = parser.parse_args()

  if args.checkpoint:
    config, variables = load_llama(args.checkpoint, dtype=args.dtype)
    if config.vocab_size != 256:
      parser.error("only byte-level (vocab 256) checkpoints have a tokenizer here")
  else:
    config = ModelConfig(layer_pattern=tuple(args.pattern.split(",")), dtype=args.dtype)
    variables = LanguageModel(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
  engine = Engine(LanguageModel(config), variables,
                  EngineConfig(num_slots=args.slots, max_len=args.max_len,
                               page_size=args.page_size, chunk_size=args.chunk_size,
                               decode_steps=args.decode_steps,
                               mixed_step_limit=args.mixed_step_limit),
                  tokenizer=ByteTokenizer())
  engine.warmup()
  server, loop = make_server(engine, ByteTokenizer(), host=args.host, port=args.port)
  print(f"serving on http://{args.host}:{server.server_address[1]}/v1/completions", flush=True)
  try:
    server.serve_forever()
  finally:
    loop.close()


if __name__ == "__main__":
  main()
