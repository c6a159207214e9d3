"""Upload a trained model to the Hugging Face Hub (`--push-to-hub REPO`, `preftune push RUN_DIR REPO`).

    from preftune.hub import push_run
    url = push_run("runs/dpo", "me/my-dpo-model")     # final/ (with its model card) → a private repo

Authentication is huggingface_hub's own: HF_TOKEN or the token `hf auth login` saved. Every failure (offline
mode, no token, a rejected token, no network, a bad repository name) is one PreftuneError sentence; the
training callback prints it and lets the finished run end normally, since the model is safe on disk and
`preftune push` can upload it later.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from preftune.callbacks import Callback
from preftune.errors import PreftuneError
from preftune.outputs.model_card import write_model_card_for_run
from preftune.outputs.run_dir import RunDir


def _later(folder: Path, repo_id: str) -> str:
    return f"the model stays in {folder}; upload it later with `preftune push {folder} {repo_id}`"


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = True, token: str | None = None,
                commit_message: str | None = None, endpoint: str | None = None) -> str:
    """Upload every file of `folder` to the model repository `repo_id` (created, private by default, when it
    does not exist) in one commit; returns the commit URL."""
    from huggingface_hub import HfApi, constants, errors, get_token

    if not isinstance(folder, (str, os.PathLike)) or not isinstance(repo_id, str):
        raise PreftuneError("push_to_hub takes a folder path and a repository name (user/name) as text, got "
                            f"{type(folder).__name__} and {type(repo_id).__name__}.")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise PreftuneError(f"cannot push {folder}: it is not a folder.")
    linked = next((Path(root) / n for root, dirs, files in os.walk(folder) for n in dirs + files
                   if os.path.islink(os.path.join(root, n))), None)
    if linked is not None:  # the upload would send whatever the link points to
        raise PreftuneError(f"cannot push {folder}: {linked} is a symbolic link (to {os.readlink(linked)}); "
                            "preftune uploads only the folder's own files: replace the link by the file or remove it.")
    if constants.HF_HUB_OFFLINE:
        raise PreftuneError(f"cannot push to the Hub: offline mode is on (HF_HUB_OFFLINE=1); {_later(folder, repo_id)}.")
    token = token or get_token()
    if not token:
        raise PreftuneError(f"cannot push to the Hub: not logged in (run `hf auth login` or set HF_TOKEN); "
                            f"{_later(folder, repo_id)}.")
    api = HfApi(token=token, endpoint=endpoint)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message=commit_message or "Upload model trained with preftune",
                                 ignore_patterns=[".tmp*", "*.tmp"])
    except errors.HFValidationError as e:
        raise PreftuneError(f"{repo_id!r} is not a valid Hub repository name ({_first(e)}).") from None
    except errors.OfflineModeIsEnabled:
        raise PreftuneError(f"cannot push to the Hub: offline mode is on; {_later(folder, repo_id)}.") from None
    except errors.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        why = {401: "the Hub rejected the token (HTTP 401: log in again with `hf auth login`)",
               403: f"the token may not write to {repo_id} (HTTP 403: it needs write access)"}.get(
            status, f"the Hub answered HTTP {status} ({_first(e)})")
        raise PreftuneError(f"cannot push to the Hub: {why}; {_later(folder, repo_id)}.") from None
    except Exception as e:  # transport errors (no network, DNS, TLS) come from httpx, not as OSError
        raise PreftuneError(f"cannot reach the Hub ({type(e).__name__}: {_first(e)}); "
                            f"{_later(folder, repo_id)}.") from None
    return str(getattr(info, "commit_url", info))


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def model_folder(run_or_model: str | Path) -> Path:
    """The folder to upload: RUN/final for a run folder, else the model folder itself."""
    if not isinstance(run_or_model, (str, os.PathLike)):
        raise PreftuneError(f"pass a run folder or a model folder as a path, got {type(run_or_model).__name__}.")
    path = Path(run_or_model).expanduser()
    if (path / "final").is_dir():
        return path / "final"
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return path
    raise PreftuneError(f"{path} holds no model to push: pass a finished run folder (with final/) or a model folder.")


def push_run(run_or_model: str | Path, repo_id: str, **kwargs: Any) -> str:
    """`preftune push`: upload a run's final/ (writing its model card first when it has none) or a model
    folder; keyword arguments as for `push_to_hub`."""
    folder = model_folder(run_or_model)
    if not isinstance(repo_id, str):
        raise PreftuneError(f"the repository is named as text (user/name), got {type(repo_id).__name__}.")
    card = folder / "README.md"
    if folder.name == "final" and not card.exists() and (folder.parent / "config.yaml").is_file():
        # written like any run file: only into a folder preftune made, never through a link (dangling or not)
        RunDir.existing(folder.parent, "push", "put a README.md of your own into its final/ to upload it as it is")
        write_model_card_for_run(folder.parent)
    return push_to_hub(folder, repo_id, **kwargs)


class HubCallback(Callback):
    """Training callback: uploads final/ to `config.push_to_hub` when training ends with a final model.

    A failed upload prints one sentence and never fails the finished run. Install it after
    ModelCardCallback so that the card goes up with the weights.
    """

    def __init__(self, printer=print):
        self.printer = printer

    def on_train_end(self, state) -> None:
        repo = getattr(state.config, "push_to_hub", None)
        if not repo or not state.is_main_process or state.interrupted or state.final_dir is None:
            return
        try:
            url = push_to_hub(state.final_dir, repo, private=getattr(state.config, "hub_private", True))
        except PreftuneError as e:
            self.printer(f"preftune: the model was not pushed: {e}")
            return
        self.printer(f"pushed {state.final_dir} to {repo}: {url}")
