"""The OpenAI-style HTTP server on a byte model: completion equals the engine's, streaming, HTTP 400s."""

import json
import threading
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import pytest

from jaxchunk.config import ModelConfig
from jaxchunk.models.language_model import LanguageModel
from jaxchunk.serving import Engine, EngineConfig, SamplingParams
from jaxchunk.serving.http import make_server
from jaxchunk.serving.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def server():
  cfg = ModelConfig(vocab_size=256, d_model=32, layer_pattern=("attention",), num_heads=2,
                    num_kv_heads=1, head_dim=8, mlp_hidden=64)
  model = LanguageModel(cfg)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
  engine = Engine(model, variables, EngineConfig(num_slots=2, max_len=64, page_size=8, chunk_size=8),
                  tokenizer=ByteTokenizer())
  expected = engine.generate([ByteTokenizer().encode("hello")], SamplingParams(max_tokens=6))[0]
  httpd, loop = make_server(engine, ByteTokenizer(), host="127.0.0.1", port=0)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_address[1]}", expected, engine
  httpd.shutdown()
  loop.close()


def post(url, payload):
  request = urllib.request.Request(url + "/v1/completions", data=json.dumps(payload).encode(),
                                   headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(request, timeout=60) as response:
    return response.read().decode()


def test_completion_and_stream(server):
  url, expected, engine = server
  reply = json.loads(post(url, {"prompt": "hello", "max_tokens": 6, "logprobs": 1}))
  choice = reply["choices"][0]
  assert choice["text"] == expected.text and choice["finish_reason"] == "length"
  assert len(choice["logprobs"]["token_logprobs"]) == 6
  lines = [l for l in post(url, {"prompt": "hello", "max_tokens": 6, "stream": True}).split("\n\n")
           if l]
  assert lines[-1] == "data: [DONE]"
  chunks = [json.loads(l[len("data: "):]) for l in lines[:-1]]
  assert "".join(c["choices"][0]["text"] for c in chunks) == expected.text
  assert chunks[-1]["choices"][0]["finish_reason"] == "length"
  assert engine.pool.num_free == engine.pool.capacity


@pytest.mark.parametrize("payload, message", [
    ({"prompt": ""}, "prompt"), ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "best_of": 2}, "unknown fields"), ({"prompt": "x" * 80}, "max_len"),
    ({"prompt": "hi", "max_tokens": 100}, "max_len")])
def test_bad_requests_get_400(server, payload, message):
  url, _, _ = server
  with pytest.raises(urllib.error.HTTPError) as error:
    post(url, payload)
  assert error.value.code == 400
  assert message in json.loads(error.value.read())["error"]["message"]
