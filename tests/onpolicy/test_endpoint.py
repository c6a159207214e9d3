"""The endpoint judge against a chat-completions server started here on 127.0.0.1: scores, a 500 and a timeout
retried, verdicts cached so a second judge pays nothing, and each failure as one sentence."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from preftune.errors import PreftuneError
from preftune.onpolicy.endpoint import DEFAULT_TEMPLATE, EndpointJudge, check_reachable, fill
from preftune.onpolicy.judges import Group

WHERE = "prompts.jsonl line 3"


class Server:
    """Answers each request with the number of words after "Answer:" in its message (1 when it has none), unless
    `plan` says to fail:
    the first `fail` requests (and those from number `fail_from` on) get HTTP `status`, the next `hang` ones sleep
    `hang_s` before answering."""

    def __init__(self):
        self.plan = {"fail": 0, "status": 500, "hang": 0, "hang_s": 1.0, "reply": None, "body": None, "fail_from": None}
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    n = len(server.requests)
                    server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                plan = server.plan
                if n < plan["fail"] or (plan["fail_from"] is not None and n >= plan["fail_from"]):
                    self.send_response(plan["status"])
                    self.end_headers()
                    self.wfile.write(b'{"error": "model overloaded"}')
                    return
                if n < plan["fail"] + plan["hang"]:
                    time.sleep(plan["hang_s"])
                content = body["messages"][0]["content"]
                words = len(content.split("Answer:\n", 1)[1].split()) if "Answer:\n" in content else 1
                reply = plan["reply"] or str(words)
                data = plan["body"] or json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        class Quiet(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a client that gave up (timeout, reply too long) closed the socket: expected here

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


GROUPS = [Group("question: red cat", ["one", "one two three", "a b"], WHERE, 0),
          Group([{"role": "system", "content": "be brief"}, {"role": "user", "content": "sun?"}], ["x y", "z"], WHERE, 1)]


def test_scores_retries_and_the_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sekrit")
    server.plan.update(fail=1, hang=1, hang_s=1.0)  # one 500, then one answer slower than the 0.3 s timeout
    judge = EndpointJudge(server.url, "judge-7b", timeout=0.3, retries=2, concurrency=2, backoff=0.01,
                          cache=tmp_path / "judge-cache-0.jsonl", cache_dir=tmp_path, api_key_env="MY_KEY")
    assert judge.score(GROUPS) == [[1.0, 3.0, 2.0], [2.0, 1.0]]
    assert len(server.requests) == 5 + 2 and judge.requests == 7  # five answers, two of them tried twice
    first = server.requests[-1]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sekrit"
    assert first["body"]["model"] == "judge-7b" and first["body"]["temperature"] == 0
    sent = {r["body"]["messages"][0]["content"] for r in server.requests}
    assert fill(DEFAULT_TEMPLATE, "question: red cat", "a b") in sent
    assert "Request:\nsystem: be brief\nuser: sun?\n\nAnswer:\nz" in fill(DEFAULT_TEMPLATE, GROUPS[1].prompt, "z")
    again = EndpointJudge(server.url, "judge-7b", cache_dir=tmp_path)  # a rerun: every verdict from the cache
    assert again.score(GROUPS) == [[1.0, 3.0, 2.0], [2.0, 1.0]] and again.requests == 0
    other = EndpointJudge(server.url, "judge-7b", template="Score {answer} for {prompt}:", cache_dir=tmp_path)
    assert other.score(GROUPS[:1]) == [[1.0, 1.0, 1.0]] and other.requests == 3  # another template, new questions


@pytest.mark.parametrize("plan, message", [
    ({"fail": 99}, f"the judge endpoint .* failed on the prompt at {WHERE} after 2 tries \\(HTTP 500: "
                   "'{\"error\": \"model overloaded\"}'\\); check the server"),
    ({"fail": 99, "status": 404}, f"answered HTTP 404 \\(.*\\) on the prompt at {WHERE}; check --judge-url"),
    ({"hang": 99, "hang_s": 0.5}, "after 2 tries \\(no answer within the timeout\\)"),
    ({"reply": "I cannot rate this."}, "replied 'I cannot rate this.' to an answer to the prompt at .* no number"),
    ({"body": b"x" * 2_000_000}, "sent more than 1,048,576 bytes"),
    ({"body": b"<html>not json</html>"}, "sent '<html>not json</html>' .* not a chat completion"),
])
def test_failures_are_one_sentence(server, plan, message):
    server.plan.update(plan)
    judge = EndpointJudge(server.url, "m", timeout=0.2, retries=1, backoff=0.01)
    with pytest.raises(PreftuneError, match=message):
        judge.score(GROUPS[:1])


def test_an_unreachable_endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    with pytest.raises(PreftuneError, match=f"cannot reach the judge endpoint http://127.0.0.1:{port}/v1 .*start "
                                            "the server or check --judge-url"):
        check_reachable(f"http://127.0.0.1:{port}/v1")
    with pytest.raises(PreftuneError, match="must be an http\\(s\\) URL"):
        check_reachable("127.0.0.1:8000")


def test_a_pairs_run_that_failed_pays_for_no_verdict_twice(server, tiny_model_dir, tmp_path):
    """The endpoint refuses (HTTP 403) from its 7th request on; the rerun asks only for the verdicts not cached."""
    from preftune.onpolicy import make_pairs

    (tmp_path / "p.txt").write_text("red cat\nblue river\ngreen tree\nsun moon\n")
    kw = dict(model=str(tiny_model_dir), prompts=str(tmp_path / "p.txt"), output=str(tmp_path / "pairs.jsonl"),
              judge_url=server.url, judge_model="m", judge_concurrency=2, samples=3, max_new_tokens=3,
              batch_size=6, device="cpu", progress=False, say=lambda _: None)
    server.plan.update(fail_from=6, status=403)
    with pytest.raises(PreftuneError, match="answered HTTP 403"):
        make_pairs(**kw)
    cached = len((tmp_path / "pairs.state" / "judge-cache-0.jsonl").read_text().splitlines())
    assert cached >= 6 - 1  # every answer received was kept (one more may have been in flight)
    server.plan.update(fail_from=None)
    before = len(server.requests)
    result = make_pairs(**kw)
    assert len(server.requests) - before == result.summary["distinct_answers"] - cached


def test_the_readme_shows_the_default_template():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert f"```\n{DEFAULT_TEMPLATE}\n```" in readme
