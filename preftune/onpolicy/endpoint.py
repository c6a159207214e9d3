"""An LLM judge behind an OpenAI-compatible chat-completions endpoint (vLLM, TGI, llama.cpp, Ollama, OpenAI...).

    preftune pairs --model runs/sft/final --prompts prompts.jsonl --output pairs.jsonl \\
        --judge-url http://127.0.0.1:8000/v1 --judge-model Qwen/Qwen2.5-7B-Instruct

Each answer is one request: the template (`--judge-template`, text or a file; `{prompt}` and `{answer}` are
replaced) as the user message, temperature 0. The first number in the reply is the score. The default template,
`DEFAULT_TEMPLATE`, asks for a score from 1 to 10 and the number only (the README shows it whole).

A conversation prompt is shown as "role: content" lines. `OPENAI_API_KEY` (or the variable `--judge-api-key-env`
names) is sent as a bearer token when set. Each request gets `timeout` seconds; a refused connection, a timeout,
HTTP 408/429/5xx are retried `retries` times with exponential backoff (Retry-After honoured, at most 60 s); other
HTTP errors and unreadable replies stop the run with one sentence. `concurrency` requests are in flight at once.
Every score is appended to a cache file (JSON Lines, keyed by a hash of model, template and texts) as soon as it
arrives, so a rerun after a crash or a kill pays for no request twice; appended like every file preftune writes
(outputs/files.py: never through a link at its name, a failed append cut back to whole lines).

HTTP is the standard library's urllib: one JSON POST per call needs no client library, and preftune declares
none (huggingface_hub's httpx is an implementation detail of that package, not an API of ours).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError
from preftune.judging import short
from preftune.onpolicy.judges import Group, Judge
from preftune.outputs.files import append_text, writing

DEFAULT_TEMPLATE = """Rate how well the answer responds to the request below, on a scale of 1 to 10 (10 = a
correct, complete, clear and concise answer; 1 = wrong, off-topic or unreadable).
Reply with the number only.

Request:
{prompt}

Answer:
{answer}"""
MAX_REPLY_BYTES = 1 << 20  # a chat completion with a score is a few hundred bytes
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class _Retry(Exception):
    """A failure worth another try (and, after the last, the reason given)."""

    def __init__(self, reason: str, wait_s: float | None = None):
        super().__init__(reason)
        self.wait_s = wait_s


def chat_url(url: str) -> str:
    """The chat-completions URL of a base URL (".../v1") or of the full one."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def check_reachable(url: str, timeout: float = 5.0) -> None:
    """One sentence, before any model is loaded, when nothing listens at `url`."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PreftuneError(f"--judge-url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {url!r}.")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise PreftuneError(f"cannot reach the judge endpoint {url} ({e.strerror or e}); start the server or "
                            "check --judge-url.") from None


def render_prompt(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt)


def fill(template: str, prompt: Any, answer: str) -> str:
    # str.replace, not str.format: the texts may hold braces of their own.
    return template.replace("{prompt}", render_prompt(prompt)).replace("{answer}", answer)


def read_template(value: str | None) -> str:
    """The template: None for the default, a path to a text file, or the text itself."""
    if value is None:
        return DEFAULT_TEMPLATE
    if "{answer}" not in value and Path(value).is_file():
        value = Path(value).read_text(encoding="utf-8")
    if "{answer}" not in value:
        raise PreftuneError("--judge-template must contain {answer} (and usually {prompt}): the text sent to the "
                            "judge, or a file that holds it.")
    return value


class EndpointJudge(Judge):
    kind = "endpoint"

    def __init__(self, url: str, model: str, *, template: str | None = None, timeout: float = 60.0,
                 retries: int = 3, concurrency: int = 4, backoff: float = 1.0, cache: Path | None = None,
                 cache_dir: Path | None = None, api_key_env: str = "OPENAI_API_KEY"):
        self.url, self.model, self.template = chat_url(url), model, read_template(template)
        self.name = f"{model} at {url}"
        self.timeout, self.retries, self.concurrency, self.backoff = timeout, retries, concurrency, backoff
        self.api_key = os.environ.get(api_key_env) or None
        self.requests = 0  # sent by this process (retries included); what a rerun saves shows here
        self._lock = threading.Lock()
        self._cache_file = cache
        self._cache: dict[str, float] = {}
        for f in sorted(cache_dir.glob("judge-cache*.jsonl")) if cache_dir and cache_dir.is_dir() else []:
            for line in f.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self._cache[entry["key"]] = float(entry["score"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a kill: that request is simply made again

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model, "template": hashlib.sha256(self.template.encode()).hexdigest()}

    def score(self, groups: Sequence[Group]) -> list[list[float]]:
        jobs = [(g, i, a) for g in groups for i, a in enumerate(g.answers)]
        out = [[0.0] * len(g.answers) for g in groups]
        slot = {id(g): n for n, g in enumerate(groups)}
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="preftune-judge") as pool:
            futures = {pool.submit(self.score_one, g.prompt, a, g.where): (g, i) for g, i, a in jobs}
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in done if f.exception() is not None), None)
            if failed is not None:
                for f in futures:
                    f.cancel()  # requests not yet sent are not sent; those in flight finish and are cached
                raise failed.exception()
        for f, (g, i) in futures.items():
            out[slot[id(g)]][i] = f.result()
        return out

    def score_one(self, prompt: Any, answer: str, where: str) -> float:
        content = fill(self.template, prompt, answer)
        body = {"model": self.model, "messages": [{"role": "user", "content": content}], "temperature": 0}
        key = hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        if key in self._cache:
            return self._cache[key]
        reply = self._post(body, where)
        match = _NUMBER.search(reply)
        if match is None:
            raise PreftuneError(f"the judge {self.name} replied {short(reply)} to an answer to the prompt at {where}, "
                                "with no number in it; change --judge-template to ask for a score.")
        score = float(match.group())
        with self._lock:
            self._cache[key] = score
            if self._cache_file is not None:
                line = json.dumps({"key": key, "score": score, "reply": reply[:200]}, ensure_ascii=False) + "\n"
                with writing(f"the judge's verdict cache {self._cache_file}", self._cache_file.parent,
                             "run the same command again (the verdicts cached so far are kept)"):
                    append_text(self._cache_file, line, "pass another --output (pairs) or --output-dir (iterate)")
        return score

    def _post(self, body: dict, where: str) -> str:
        data = json.dumps(body, ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            try:
                return self._once(urllib.request.Request(self.url, data=data, headers=headers), where)
            except _Retry as e:
                if attempt == self.retries:
                    raise PreftuneError(f"the judge endpoint {self.url} failed on the prompt at {where} after "
                                        f"{attempt + 1} tries ({e}); check the server, or raise --judge-timeout / "
                                        "--judge-retries.") from None
                time.sleep(min(e.wait_s if e.wait_s is not None else self.backoff * 2 ** attempt, 60.0))
        raise AssertionError("unreachable")

    def _once(self, request: urllib.request.Request, where: str) -> str:
        with self._lock:
            self.requests += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read(MAX_REPLY_BYTES + 1)
        except urllib.error.HTTPError as e:
            detail = short(e.read(2000).decode("utf-8", "replace"))
            if e.code in RETRY_STATUS:
                after = e.headers.get("Retry-After", "")
                raise _Retry(f"HTTP {e.code}: {detail}", float(after) if after.isdigit() else None) from None
            raise PreftuneError(f"the judge endpoint {self.url} answered HTTP {e.code} ({detail}) on the prompt at "
                                f"{where}; check --judge-url, --judge-model and the API key.") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            raise _Retry("no answer within the timeout" if isinstance(reason, TimeoutError)
                         else str(reason) or type(e).__name__) from None
        if len(raw) > MAX_REPLY_BYTES:
            raise PreftuneError(f"the judge endpoint {self.url} sent more than {MAX_REPLY_BYTES:,} bytes for the "
                                f"prompt at {where}; a score is a few hundred.")
        try:
            return str(json.loads(raw)["choices"][0]["message"]["content"] or "")
        except (ValueError, KeyError, IndexError, TypeError):
            raise PreftuneError(f"the judge endpoint {self.url} sent {short(raw.decode('utf-8', 'replace'))} for the "
                                f"prompt at {where}, not a chat completion; is it OpenAI-compatible?") from None
