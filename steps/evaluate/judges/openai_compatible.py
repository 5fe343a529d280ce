"""``openai_compatible[:<served model>]``: alpaca_eval's weighted annotator (its template, seeded swap and log-prob
rule) sent to any OpenAI-compatible chat-completions server (vLLM, OpenAI), with retries, a request budget, and the
key read from the environment at request time only (never stored, logged or cached). Owns the served judge's
defaults."""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from tqdm.auto import tqdm

from steps.evaluate.judges.annotator_prompt import (
    OFFICIAL_ANNOTATOR,
    AnnotatorPromptJudge,
    AnnotatorProtocol,
    read_annotator_configs,
    resolve_annotator_config,
)
from steps.evaluate.judges.base import ENDPOINT_SERVED, Judge, JudgeError, JudgeSettings
from steps.evaluate.judges.registry import register_judge
from steps.models import DEFAULT_MODEL

logger = logging.getLogger(__name__)

#: Seconds to wait for each reply before retrying.
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_MAX_RETRIES = 6
#: Requests in flight at once.
DEFAULT_CONCURRENCY = 4
#: Retry tuning a caller may set (attributes of the judge; ``make_judge`` keywords).
RETRY_SETTINGS = ("max_retries", "backoff_s", "max_backoff_s")
#: Retried statuses: request timeout, conflict, rate limit, and every 5xx.
RETRY_STATUSES = frozenset({408, 409, 429})
#: The official annotator's request settings; read from its config, these are what it must say.
REQUEST_KEYS = ("max_tokens", "temperature", "logprobs", "top_logprobs")


def request_settings(annotator_config: str = OFFICIAL_ANNOTATOR) -> dict[str, Any]:
    """``max_tokens``, ``temperature``, ``logprobs`` and ``top_logprobs`` from the annotator's alpaca_eval config."""
    path = resolve_annotator_config(annotator_config)
    (settings,) = read_annotator_configs(path).values()
    kwargs = settings.get("completions_kwargs") or {}
    missing = [k for k in REQUEST_KEYS if k not in kwargs]
    if missing or not kwargs.get("logprobs"):
        raise JudgeError(
            f"{path}: the served judge needs a log-prob annotator whose completions_kwargs set "
            f"{', '.join(REQUEST_KEYS)} (logprobs true); missing {missing}"
        )
    return {k: kwargs[k] for k in REQUEST_KEYS}


@register_judge("openai_compatible")
class ServedJudge(AnnotatorPromptJudge):
    """The weighted AlpacaEval annotator against ``base_url``'s ``/chat/completions`` serving ``model``.

    Each pair is one request: alpaca_eval's prompt as system/user messages, outputs swapped by its seeded coin,
    ``max_tokens`` 1, ``temperature`` 1 and ``top_logprobs`` 5 as the official config says; the preference is
    alpaca_eval's rule on the returned top log-probs. 429, 5xx, timeouts and dropped connections are retried with
    exponential backoff (``Retry-After`` honoured) up to ``max_retries`` times; every HTTP attempt counts against
    ``max_requests`` (None: twice the pairs of each call, plus 10). Results reach ``on_result`` one by one, so the
    annotation cache keeps each.
    """

    argument = "served model"
    usage = ("'openai_compatible' (a served model, e.g. vLLM)",)
    endpoint = ENDPOINT_SERVED
    max_retries: int = DEFAULT_MAX_RETRIES
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0

    def __init__(
        self,
        model: str,
        base_url: str | None,
        *,
        api_key_env: str | None = None,
        max_requests: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        concurrency: int = DEFAULT_CONCURRENCY,
        protocol: AnnotatorProtocol | None = None,
        show_progress: bool = True,
    ):
        if not isinstance(model, str) or not model:
            raise JudgeError("judge 'openai_compatible' needs the served model's name (evaluation.judge_model)")
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise JudgeError(
                f"judge 'openai_compatible' needs evaluation.judge_base_url, an http(s) URL such as "
                f"http://localhost:8000/v1, got {base_url!r}"
            )
        for field, value in (("judge_max_requests", max_requests), ("judge_concurrency", concurrency)):
            _check_count(field, value, 1)
        if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not timeout_s > 0:
            raise JudgeError(f"judge_timeout_s must be a number > 0, got {timeout_s!r}")
        super().__init__(model, protocol or AnnotatorProtocol())
        self.base_url = str(base_url).rstrip("/")
        self.api_key_env = api_key_env or None
        self.max_requests, self.timeout_s, self.concurrency = max_requests, float(timeout_s), concurrency
        self.show_progress = show_progress
        self._settings: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._budget: int | None = max_requests
        self.requests_made = 0
        self.retries = 0

    @classmethod
    def from_options(cls, argument: str | None, options: JudgeSettings) -> Judge:
        """The served model's name after ``openai_compatible:`` wins over ``judge_model``; keywords beyond the
        evaluation knobs: ``annotator_config``, ``switch_seed`` and the retry tuning (:data:`RETRY_SETTINGS`)."""
        served = argument if argument is not None else options.judge_model
        if not served or served == DEFAULT_MODEL or served.startswith(("embedded:", "tiny")):
            raise JudgeError(
                f"judge 'openai_compatible' needs the name the server serves its model under "
                f"(evaluation.judge_model, e.g. meta-llama/Llama-3.1-70B-Instruct), got {served!r}"
            )
        extra = dict(options.extra)
        protocol = AnnotatorProtocol(**{k: extra.pop(k) for k in ("annotator_config", "switch_seed") if k in extra})
        retry = {k: extra.pop(k) for k in RETRY_SETTINGS if k in extra}
        if extra:
            raise JudgeError(
                f"options {sorted(extra)} are not for judge 'openai_compatible'; beyond the evaluation.judge_* "
                f"knobs it takes annotator_config, switch_seed, {', '.join(RETRY_SETTINGS)}"
            )
        _check_count("max_retries", retry.get("max_retries"), 0)
        judge = cls(
            served,
            options.judge_base_url,
            api_key_env=options.judge_api_key_env,
            max_requests=options.judge_max_requests,
            timeout_s=DEFAULT_TIMEOUT_S if options.judge_timeout_s is None else options.judge_timeout_s,
            concurrency=DEFAULT_CONCURRENCY if options.judge_concurrency is None else options.judge_concurrency,
            protocol=protocol,
            show_progress=options.show_progress,
        )
        for name, value in retry.items():
            setattr(judge, name, value)
        return judge

    @property
    def cache_identity(self) -> str:
        # the server's address is not part of it: the same model behind another URL gives the same judgement
        s = self.settings
        return (
            f"{self.label}|template={self.annotator_config}|switch_seed={self.switch_seed}"
            f"|max_tokens={s['max_tokens']}|temperature={s['temperature']}|top_logprobs={s['top_logprobs']}"
        )

    @property
    def price_model(self) -> str | None:
        return self.judge_model

    @property
    def settings(self) -> dict[str, Any]:
        if self._settings is None:
            self._settings = request_settings(self.annotator_config)
        return self._settings

    def metadata(self) -> dict[str, Any]:
        return {
            **super().metadata(),
            "judge_model": self.judge_model,
            "judge_base_url": self.base_url,
            "judge_api_key_env": self.api_key_env,
            "judge_requests_made": self.requests_made,
            "judge_retries": self.retries,
        }

    def check(self) -> None:
        """Template and request settings readable; the key variable (when named) set. Sends nothing."""
        _ = self.template, self.settings
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise JudgeError(
                f"judge {self.label} reads its API key from ${self.api_key_env}, which is not set; "
                f"export it, or set evaluation.judge_api_key_env to null for a server without a key"
            )

    # -- one request ----------------------------------------------------------------------------------------------

    def _spend(self) -> None:
        with self._lock:
            if self._budget is not None and self._budget <= 0:
                raise JudgeError(
                    f"judge {self.label}: request budget exhausted after {self.requests_made} requests "
                    f"(evaluation.judge_max_requests); judgements made so far are cached, so a rerun "
                    f"with a larger budget sends only the rest"
                )
            if self._budget is not None:
                self._budget -= 1
            self.requests_made += 1

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise JudgeError(f"${self.api_key_env} is not set (the API key of judge {self.label})")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _scrub(self, text: str) -> str:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return text.replace(key, "***") if key else text

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        delay = min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.75 + 0.5 * random.random())
        if retry_after and retry_after.replace(".", "", 1).isdigit():  # seconds (an HTTP date is ignored)
            delay = min(self.max_backoff_s, float(retry_after))
        with self._lock:
            self.retries += 1
        time.sleep(delay)

    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``/chat/completions``; retried on 429/5xx/timeouts; the parsed JSON reply."""
        url = f"{self.base_url}/chat/completions"
        data = json.dumps(body).encode("utf-8")
        last = ""
        for attempt in range(self.max_retries + 1):
            self._spend()
            request = urllib.request.Request(url, data=data, headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as exc:
                detail = self._scrub(exc.read(500).decode("utf-8", "replace"))
                if exc.code not in RETRY_STATUSES and exc.code < 500:
                    hint = f" (is ${self.api_key_env} the right key?)" if exc.code in (401, 403) else ""
                    raise JudgeError(f"judge {self.label}: {url} answered HTTP {exc.code}{hint}: {detail}") from None
                last = f"HTTP {exc.code}: {detail}"
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
            except (
                TimeoutError,
                ConnectionError,
                http.client.HTTPException,
                urllib.error.URLError,
                json.JSONDecodeError,
            ) as exc:
                last, retry_after = self._scrub(f"{type(exc).__name__}: {exc}"), None
            if attempt < self.max_retries:
                logger.warning("judge %s: %s; retry %d of %d", self.label, last, attempt + 1, self.max_retries)
                self._wait(attempt, retry_after)
        raise JudgeError(f"judge {self.label}: {url} failed {self.max_retries + 1} times; last: {last}")

    def judge_one(self, instruction: str, output_1: str, output_2: str, switched: bool) -> dict[str, Any]:
        """One judgement in alpaca_eval's annotation fields; ``switched`` shows output_2 first."""
        started = time.monotonic()
        first, second = (output_2, output_1) if switched else (output_1, output_2)
        reply = self.post(
            {"model": self.judge_model, "messages": self.messages(instruction, first, second), **self.settings}
        )
        try:
            choice = reply["choices"][0]
            content = (choice.get("logprobs") or {}).get("content") or []
            top = content[0]["top_logprobs"] if content else None
        except (KeyError, IndexError, TypeError, AttributeError):
            raise JudgeError(f"judge {self.label}: not a chat-completions reply: {str(reply)[:300]}") from None
        if not top:
            raise JudgeError(
                f"judge {self.label}: the server returned no top_logprobs; the weighted annotator needs "
                f"a server that supports logprobs/top_logprobs on chat completions (vLLM and OpenAI do)"
            )
        logprobs: dict[str, float] = {}
        for item in top:
            logprobs.setdefault(item["token"], float(item["logprob"]))
        usage = reply.get("usage") or {}
        return {
            "preference": self.preference(logprobs, switched),
            "raw_completion": {
                "top_logprobs": [{"token": t["token"], "logprob": t["logprob"]} for t in top],
                "text": (choice.get("message") or {}).get("content"),
                "finish_reason": choice.get("finish_reason"),
                "is_switched_outputs": switched,
                "model": reply.get("model"),
                "usage": {
                    "prompt_tokens": usage.get("prompt_tokens"),
                    "completion_tokens": usage.get("completion_tokens"),
                }
                if usage
                else None,
            },
            "time_per_example": time.monotonic() - started,
        }

    def judge_pairs(self, pairs: Sequence[dict[str, str]], on_result: Callable[[int, dict[str, Any]], None]) -> None:
        self.check()
        if self.max_requests is None:
            with self._lock:
                self._budget = 2 * len(pairs) + 10
        switched = self.switches(pairs)
        progress = tqdm(
            total=len(pairs), desc=f"judge {self.judge_model}", unit="judgement", disable=not self.show_progress
        )
        pending: dict[Future, int] = {}

        def hand_over(futures: set[Future]) -> None:
            # results reach on_result (and so the cache) from this thread, one by one
            for future in futures:
                index = pending.pop(future)
                on_result(index, future.result())
                progress.update(1)

        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="judge") as pool:
            try:
                for index, pair in enumerate(pairs):
                    future = pool.submit(
                        self.judge_one, pair["instruction"], pair["output_1"], pair["output_2"], switched[index]
                    )
                    pending[future] = index
                    while len(pending) >= self.concurrency:
                        hand_over(wait(list(pending), return_when=FIRST_COMPLETED).done)
                while pending:
                    hand_over(wait(list(pending), return_when=FIRST_COMPLETED).done)
            except BaseException:
                # keep what was already paid for: requests in flight finish and are handed over before the error
                for future in list(pending):
                    if future.cancel():
                        pending.pop(future)
                for future in wait(list(pending)).done:
                    if future.exception() is None:
                        hand_over({future})
                raise
            finally:
                progress.close()


def _check_count(field: str, value: int | None, low: int) -> None:
    """``value`` (None allowed) must be an integer >= ``low``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise JudgeError(f"{field} must be an integer >= {low}, got {value!r}")
