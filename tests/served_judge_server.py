"""A real HTTP server speaking OpenAI's chat-completions API with logprobs, backed by a local causal LM (the tiny
or the embedded model): its top_logprobs are the model's real next-token log-probabilities after the chat-templated
messages. Faults (429, 500, hangs, replies without logprobs) are injected in order, and every request is logged."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch


class ChatCompletionsServer:
    """``start()`` it, point a client at ``url``; ``requests`` lists every request received, in order."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        api_key: str | None = None,
        delay_s: float = 0.0,
        hang_s: float = 2.0,
        faults: list[str | None] | None = None,
    ):
        self.model, self.tokenizer, self.api_key = model, tokenizer, api_key
        self.delay_s, self.hang_s = delay_s, hang_s
        self.faults = list(faults or [])
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> ChatCompletionsServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:  # http.server's name
                owner.handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def user_texts(self) -> list[str]:
        """The user message of every request received, in order."""
        with self._lock:
            return [next(m["content"] for m in r["body"]["messages"] if m["role"] == "user") for r in self.requests]

    def count(self, text: str) -> int:
        """Requests whose user message contains ``text``."""
        return sum(text in u for u in self.user_texts())

    # -- one request ------------------------------------------------------------------------------------------

    def _send(
        self,
        handler: BaseHTTPRequestHandler,
        status: int,
        payload: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> None:
        data = json.dumps(payload).encode("utf-8")
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout) before the reply
            pass

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = json.loads(handler.rfile.read(int(handler.headers.get("Content-Length", 0))).decode("utf-8"))
        with self._lock:
            fault = self.faults.pop(0) if self.faults else None
            self.requests.append({"body": body, "fault": fault, "authorization": handler.headers.get("Authorization")})
        if handler.path != "/v1/chat/completions":
            return self._send(handler, 404, {"error": {"message": f"no route {handler.path}"}})
        if self.api_key is not None and handler.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._send(handler, 401, {"error": {"message": "invalid api key", "type": "auth"}})
        if fault == "429":
            return self._send(handler, 429, {"error": {"message": "rate limited"}}, {"Retry-After": "0"})
        if fault == "500":
            return self._send(handler, 500, {"error": {"message": "internal error"}})
        if fault == "hang":
            time.sleep(self.hang_s)
        reply = self.complete(body)
        if fault == "nologprobs":
            reply["choices"][0]["logprobs"] = None
        if self.delay_s:
            time.sleep(self.delay_s)
        self._send(handler, 200, reply)

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """What vLLM answers: the model's chat template over the messages, one token, its top log-probs."""
        text = self.tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        with self._model_lock, torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        top = torch.topk(logprobs, k=int(body.get("top_logprobs") or 1))
        entries = [
            {
                "token": self.tokenizer.decode([int(i)]),
                "logprob": float(v),
                "bytes": list(self.tokenizer.decode([int(i)]).encode("utf-8")),
            }
            for v, i in zip(top.values.tolist(), top.indices.tolist())
        ]
        first = entries[0]
        return {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": first["token"]},
                    "logprobs": {"content": [{**first, "top_logprobs": entries}]},
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1},
        }
