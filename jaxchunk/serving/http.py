"""An OpenAI-style HTTP front end: POST /v1/completions (optionally streamed as server-sent events).

One background thread steps the engine while it has work; handler threads (stdlib
`ThreadingHTTPServer`) submit requests and read their events from per-request queues. Bad requests
get HTTP 400 with {"error": {"message", "type": "invalid_request_error"}}; a client that disconnects
mid-stream has its request cancelled (slot and pages freed); neither stops the engine.

Request fields: prompt (str), max_tokens, temperature, top_p, top_k, seed, stop (str or list),
logprobs (bool or int: report the chosen token's log-probability), stream (bool), model (ignored).
"""

from __future__ import annotations

import collections
import http.server
import json
import queue
import threading
import time

from jaxchunk.serving.engine import Engine
from jaxchunk.serving.sampling import SamplingParams

_PASSTHROUGH = ("max_tokens", "temperature", "top_p", "top_k", "seed")
_KNOWN = set(_PASSTHROUGH) | {"prompt", "stream", "stop", "logprobs", "model"}


class EngineLoop:
  """Runs `engine.step()` on a thread and routes its events to per-request queues."""

  def __init__(self, engine: Engine):
    self.engine = engine
    self._queues: dict[int, queue.Queue] = collections.defaultdict(queue.Queue)
    self._lock = threading.Lock()
    self._wake = threading.Event()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def submit(self, prompt: list[int], params: SamplingParams) -> tuple[int, queue.Queue]:
    request_id = self.engine.submit(prompt, params)
    self._wake.set()
    with self._lock:
      return request_id, self._queues[request_id]

  def cancel(self, request_id: int) -> None:
    self.engine.cancel(request_id)
    with self._lock:
      self._queues.pop(request_id, None)

  def close(self) -> None:
    self._stop.set()
    self._wake.set()
    self._thread.join()

  def _run(self) -> None:
    while not self._stop.is_set():
      if not self.engine.has_work():
        self._wake.wait(0.05)
        self._wake.clear()
        continue
      for event in self.engine.step():
        with self._lock:
          self._queues[event.request_id].put(event)
          if event.finished:
            self._queues.pop(event.request_id, None)
            self.engine.pop_output(event.request_id)


def parse_request(body: bytes, tokenizer, max_len: int) -> tuple[list[int], SamplingParams, bool]:
  """(prompt tokens, sampling params, stream) of a /v1/completions body; ValueError if bad."""
  try:
    fields = json.loads(body)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f"body is not valid JSON: {error}") from None
  if not isinstance(fields, dict):
    raise ValueError("body must be a JSON object")
  unknown = sorted(set(fields) - _KNOWN)
  if unknown:
    raise ValueError(f"unknown fields {unknown}; expected a subset of {sorted(_KNOWN)}")
  prompt = fields.get("prompt")
  if not isinstance(prompt, str) or not prompt:
    raise ValueError("prompt must be a non-empty string")
  tokens = tokenizer.encode(prompt)
  if len(tokens) >= max_len:
    raise ValueError(f"prompt has {len(tokens)} tokens; the server's max_len is {max_len}")
  options = {k: fields[k] for k in _PASSTHROUGH if k in fields}
  if "stop" in fields:
    options["stop"] = fields["stop"]
  if "logprobs" in fields:
    options["logprobs"] = bool(fields["logprobs"])
  params = SamplingParams.from_dict(options)
  stream = fields.get("stream", False)
  if not isinstance(stream, bool):
    raise ValueError("stream must be a bool")
  return tokens, params, stream


def _finish_reason(reason: str | None) -> str | None:
  return reason if reason in (None, "stop", "length") else "stop"


def make_handler(loop: EngineLoop, tokenizer, model_name: str):
  """The request handler class of `make_server`."""
  max_len = loop.engine.config.max_len

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet
      pass

    def _json(self, status: int, payload: dict) -> None:
      body = json.dumps(payload).encode()
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
      self._json(status, {"error": {"message": message, "type": "invalid_request_error"}})

    def do_GET(self):
      if self.path == "/v1/models":
        self._json(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
      else:
        self._error(404, f"unknown path {self.path}")

    def do_POST(self):
      if self.path != "/v1/completions":
        self._error(404, f"unknown path {self.path}")
        return
      body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
      try:
        prompt, params, stream = parse_request(body, tokenizer, max_len)
        request_id, events = loop.submit(prompt, params)
      except ValueError as error:
        self._error(400, str(error))
        return
      created = int(time.time())
      head = {"id": f"cmpl-{request_id}", "object": "text_completion", "created": created,
              "model": model_name}
      if stream:
        self._stream(request_id, events, head)
        return
      text, tokens, logprobs, reason = [], [], [], None
      while reason is None:
        event = events.get()
        text.append(event.text)
        if event.token is not None:
          tokens.append(event.token)
          logprobs.append(event.logprob)
        reason = event.finish_reason if event.finished else None
      choice = {"index": 0, "text": "".join(text), "finish_reason": _finish_reason(reason),
                "logprobs": {"tokens": [tokenizer.decode([t]) for t in tokens],
                             "token_logprobs": logprobs} if params.logprobs else None}
      self._json(200, {**head, "choices": [choice], "usage": {
          "prompt_tokens": len(prompt), "completion_tokens": len(tokens),
          "total_tokens": len(prompt) + len(tokens)}})

    def _stream(self, request_id: int, events: queue.Queue, head: dict) -> None:
      self.send_response(200)
      self.send_header("Content-Type", "text/event-stream")
      self.send_header("Cache-Control", "no-cache")
      self.send_header("Connection", "close")
      self.end_headers()
      self.close_connection = True
      try:
        while True:
          event = events.get()
          choice = {"index": 0, "text": event.text,
                    "finish_reason": _finish_reason(event.finish_reason) if event.finished else None,
                    "logprobs": {"token_logprobs": [event.logprob]} if event.logprob is not None
                    else None}
          self.wfile.write(f"data: {json.dumps({**head, 'choices': [choice]})}\n\n".encode())
          self.wfile.flush()
          if event.finished:
            break
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
      except (BrokenPipeError, ConnectionResetError):
        loop.cancel(request_id)  # the client went away: free its slot

  return Handler


def make_server(engine: Engine, tokenizer, *, host: str = "127.0.0.1", port: int = 8000,
                model_name: str = "jaxchunk") -> tuple[http.server.ThreadingHTTPServer, EngineLoop]:
  """A ready HTTP server (call `serve_forever`) and the engine loop behind it (`close` it after)."""
  loop = EngineLoop(engine)
  server = http.server.ThreadingHTTPServer((host, port), make_handler(loop, tokenizer, model_name))
  server.daemon_threads = True
  return server, loop
