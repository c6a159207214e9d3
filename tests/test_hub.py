"""Pushing to the Hub against a mocked transport (huggingface_hub's own client, an httpx MockTransport that plays
the Hub's endpoints): what arrives is the run's final/ with a model card; every failure is one sentence and
the training callback never raises."""

from __future__ import annotations

import base64
import json
import shutil
from types import SimpleNamespace

import pytest

from preftune import TrainConfig
from preftune.cli import main
from preftune.errors import PreftuneError
from preftune.hub import HubCallback, push_run, push_to_hub


def _httpx():
    """The httpx flavour huggingface_hub's client is built on (httpx for 1.x, httpx2 for 2.x)."""
    import importlib

    from huggingface_hub.utils._http import default_client_factory

    client = default_client_factory()
    client.close()
    return importlib.import_module(type(client).__module__.split(".")[0])


class StubHub:
    """The endpoints a create_repo + upload_folder of small files uses; records each request."""

    def __init__(self, status: dict[str, int] | None = None, fail: Exception | None = None):
        self.requests: list[tuple[str, str]] = []
        self.created: dict = {}
        self.files: dict[str, bytes] = {}
        self.status = status or {}
        self.fail = fail

    def __call__(self, request):
        httpx2 = _httpx()
        if self.fail is not None:
            raise self.fail
        path, body = request.url.path, request.read()
        self.requests.append((request.method, path))
        for prefix, code in self.status.items():
            if path.startswith(prefix):
                return httpx2.Response(code, json={"error": "stub says no"})
        if path == "/api/repos/create":
            self.created = json.loads(body)
            return httpx2.Response(200, json={"url": "https://huggingface.co/me/m", "name": "me/m"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                         "shouldIgnore": False} for f in files]})
        if "/commit/" in path:
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return httpx2.Response(200, json={"commitUrl": "https://huggingface.co/me/m/commit/" + "a" * 40,
                                              "commitOid": "a" * 40, "pullRequestUrl": None})
        return httpx2.Response(404, json={"error": "not in the stub"})


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """Install a StubHub as huggingface_hub's transport, online, with a token; restore afterwards."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils._http import default_client_factory

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    stubs: list[StubHub] = []

    httpx2 = _httpx()

    def install(stub: StubHub) -> StubHub:
        stubs.append(stub)
        huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(stub)))
        return stub

    yield install
    huggingface_hub.set_client_factory(default_client_factory)


def test_push_run_uploads_final_with_a_model_card(hub, tiny_dpo_run, tmp_path):
    from huggingface_hub import ModelCard

    run = tmp_path / "run"
    shutil.copytree(tiny_dpo_run, run)
    stub = hub(StubHub())
    url = push_run(run, "me/m")
    assert url.endswith("/commit/" + "a" * 40)
    assert stub.created == {"name": "m", "organization": "me", "visibility": "private", "type": "model"}
    local = {p.name: p.read_bytes() for p in (run / "final").iterdir()}
    assert stub.files == local and "README.md" in local  # the card was written first, then uploaded
    card = ModelCard(stub.files["README.md"].decode())
    assert card.data.library_name == "transformers" and "preftune" in card.data.tags


def test_callback_pushes_and_failures_never_raise(hub, tiny_dpo_run, monkeypatch):
    lines: list[str] = []
    state = SimpleNamespace(config=TrainConfig(push_to_hub="me/m", hub_private=False), is_main_process=True,
                            interrupted=False, final_dir=tiny_dpo_run / "final")
    stub = hub(StubHub())
    HubCallback(printer=lines.append).on_train_end(state)
    assert lines[-1].startswith("pushed ") and stub.created["visibility"] == "public"

    hub(StubHub(status={"/api/repos/create": 401}))
    HubCallback(printer=lines.append).on_train_end(state)  # returns normally: the run ends with exit 0
    assert lines[-1].startswith("preftune: the model was not pushed: cannot push to the Hub: the Hub rejected the token")


def test_failures_are_one_sentence(hub, tiny_dpo_run, monkeypatch):
    from huggingface_hub import constants

    httpx2 = _httpx()

    final = tiny_dpo_run / "final"
    hub(StubHub(status={"/api/repos/create": 403}))
    with pytest.raises(PreftuneError, match="may not write to me/m \\(HTTP 403"):
        push_to_hub(final, "me/m")
    hub(StubHub(fail=httpx2.ConnectError("[Errno 101] Network is unreachable")))
    with pytest.raises(PreftuneError, match="cannot reach the Hub \\(ConnectError: \\[Errno 101\\] Network is unreachable\\)"):
        push_to_hub(final, "me/m")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PreftuneError, match="not logged in \\(run `hf auth login` or set HF_TOKEN\\)"):
        push_to_hub(final, "me/m")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PreftuneError, match="offline mode is on"):
        push_to_hub(final, "me/m")


def test_cli_push_offline_is_one_line(tiny_dpo_run, tmp_path, capsys):
    # The test session runs with HF_HUB_OFFLINE=1 (conftest): nothing may reach a network.
    run = tmp_path / "run"
    shutil.copytree(tiny_dpo_run, run)
    assert main(["push", str(run), "me/m"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "offline mode is on" in err and f"preftune push {run / 'final'} me/m" in err


def test_push_to_hub_setting_is_validated():
    assert TrainConfig(push_to_hub="me/model-1.5").push_to_hub == "me/model-1.5"
    for bad in ("me/m/x", "me/", "a--b/c", 3):
        with pytest.raises(PreftuneError, match="push_to_hub must be (a Hub repository name|text)"):
            TrainConfig(push_to_hub=bad)


def test_push_never_writes_or_uploads_through_a_link(hub, tiny_dpo_run, tmp_path):
    """A dangling link planted at final/README.md: the card is not written through it (its target is not
    created); a link inside final/ to a file outside: not uploaded; push_run(None, ...): one sentence. Nothing
    reaches the Hub in any of them."""
    run = tmp_path / "run"
    shutil.copytree(tiny_dpo_run, run)
    stub = hub(StubHub())
    (run / "final" / "README.md").unlink(missing_ok=True)
    (run / "final" / "README.md").symlink_to(tmp_path / "card.md")
    with pytest.raises(PreftuneError, match="final/README.md is a symbolic link"):
        push_run(run, "me/m")
    assert not (tmp_path / "card.md").exists()
    (run / "final" / "README.md").unlink()
    (tmp_path / "secret.txt").write_text("not for the Hub")
    (run / "final" / "secret.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(PreftuneError, match="final/secret.txt is a symbolic link .*uploads only the folder's own"):
        push_run(run, "me/m")
    with pytest.raises(PreftuneError, match="pass a run folder or a model folder as a path, got NoneType"):
        push_run(None, "me/m")
    assert stub.requests == []
