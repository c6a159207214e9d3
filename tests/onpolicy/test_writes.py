"""`preftune pairs` and `preftune iterate` write like a training run (issue 26): a symbolic link at any name they
write (the pairs file, its summary, its state folder and what is in it, the judge's verdict cache, iterate's
rounds.json, a round folder, report/) is refused in one sentence before anything is written, and the link's target
is untouched; appends never follow a link, even one planted after the run opened its files; iterate's folder
carries preftune's mark, is refused by `train`, and a run stops when its folder is deleted under it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.errors import PreftuneError
from preftune.onpolicy.endpoint import EndpointJudge
from preftune.onpolicy.iterate_store import IterateFolder
from preftune.onpolicy.store import PairsStore
from preftune.outputs.report import write_report
from preftune.outputs.run_dir import MARK, RunDir

ROW = {"prompt": "q", "chosen": "a", "rejected": "b", "source": {"prompt_index": 0}}


@pytest.fixture
def mine(tmp_path) -> Path:
    """The user's own folder beside the outputs: every planted link points into it."""
    folder = tmp_path / "mine"
    (folder / "folder").mkdir(parents=True)
    (folder / "notes.txt").write_text("the user's notes\n")
    return folder


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() if p.is_file() else "/" for p in sorted(folder.rglob("*"))}


def _pairs_run(out: Path) -> PairsStore:
    """A pairs run stopped after one batch (its rows and done line on disk, no summary yet)."""
    store = PairsStore(out)
    store.open({"seed": 1})
    store.append([ROW], [{"i": 0, "pairs": [[1, 1, 1]]}])
    return store


@pytest.mark.parametrize("name, target", [
    ("p.jsonl", "new.jsonl"), ("p.summary.json", "notes.txt"), ("p.state", "folder"),
    ("p.state/done-0.jsonl", "notes.txt"), ("p.state/judge-cache-0.jsonl", "new.jsonl"),
])
def test_pairs_refuses_a_link_at_every_name_it_writes(name, target, tmp_path, mine):
    """A rerun (the same command continuing) finds the link and stops before writing: the rows file, the done
    file and the target are as they were (a dangling link's target is not created)."""
    out = tmp_path / "p.jsonl"
    _pairs_run(out)
    planted = tmp_path / name
    if planted.is_dir():
        for p in planted.iterdir():
            p.rename(mine / "folder" / p.name)  # the state moved into the user's folder, the link put in its place
        planted.rmdir()
    else:
        planted.unlink(missing_ok=True)
    planted.symlink_to(mine / target)
    before, rows = _tree(mine), out.read_text() if out.is_file() and not out.is_symlink() else None
    with pytest.raises(PreftuneError, match=f"{planted} is a symbolic link .*; preftune never writes"):
        PairsStore(out).open({"seed": 1})
    assert _tree(mine) == before
    if rows is not None:
        assert out.read_text() == rows == json.dumps(ROW) + "\n"


def test_pairs_appends_and_replaces_never_follow_a_link_planted_during_the_run(tmp_path, mine):
    store = _pairs_run(tmp_path / "p.jsonl")
    before = _tree(mine)
    for path in (store.done_path(0), store.output):  # planted after the run opened its files
        path.unlink()
        path.symlink_to(mine / "notes.txt")
        with pytest.raises(PreftuneError, match="is a symbolic link"):
            store.append([ROW], [{"i": 1, "pairs": []}])
    with pytest.raises(PreftuneError, match="p.jsonl is a symbolic link"):
        store.gather({0: {"i": 0, "rank": 0, "pairs": [[1, 1, 1]]}})
    assert _tree(mine) == before


def test_a_state_folder_preftune_did_not_write_is_refused(tmp_path):
    (tmp_path / "p.state").mkdir()
    (tmp_path / "p.state" / "mine.txt").write_text("keep")
    with pytest.raises(PreftuneError, match="p.state holds files no `preftune pairs` run wrote .*nothing was changed"):
        PairsStore(tmp_path / "p.jsonl").open({"seed": 1})
    assert [p.name for p in tmp_path.rglob("*")] == ["p.state", "mine.txt"]


def test_the_verdict_cache_is_never_appended_through_a_link(tmp_path, mine):
    cache = tmp_path / "judge-cache-0.jsonl"
    cache.symlink_to(mine / "new.jsonl")  # dangling: an append through it would create the user's file
    judge = EndpointJudge("http://127.0.0.1:9/v1", "m", cache=cache)
    judge._post = lambda body, where: "7"  # the endpoint's reply (no server needed)
    with pytest.raises(PreftuneError, match="judge-cache-0.jsonl is a symbolic link"):
        judge.score_one("q", "an answer", "line 1")
    assert not (mine / "new.jsonl").exists()


def _iterate_run(out: Path) -> IterateFolder:
    """An iterate folder after round 1 (its files as iterate writes them), lock released."""
    folder = IterateFolder(out)
    folder.open({"seed": 1}, resume=False, say=lambda _: None)
    folder.write_prompts(out / "prompts" / "train.jsonl", [])
    folder.make(folder.round_dir(1))
    folder.write_json(folder.eval_file(1), {"score": 1})
    folder.write_json(folder.rounds_file, {"rounds": []})
    folder.release()
    return folder


@pytest.mark.parametrize("name, target", [
    ("rounds.json", "notes.txt"), ("round-2", "folder"), ("round-1/eval.json", "notes.txt"), ("report", "folder"),
    ("judge-cache.jsonl", "new.jsonl"), ("prompts/train.jsonl", "notes.txt"),
])
def test_iterate_refuses_a_link_at_every_name_it_writes(name, target, tmp_path, mine):
    out = tmp_path / "run"
    _iterate_run(out)
    (out / name).unlink(missing_ok=True)
    (out / name).symlink_to(mine / target)
    before = _tree(mine)
    with pytest.raises(PreftuneError, match=f"{out / name} is a symbolic link .*choose another --output-dir"):
        IterateFolder(out).open({"seed": 1}, resume=True, say=lambda _: None)
    assert _tree(mine) == before and not (out / ".preftune.lock").exists()


def test_iterate_folder_is_marked_owned_and_not_recreated(tmp_path, mine):
    out = tmp_path / "run"
    _iterate_run(out)
    mark = json.loads((out / MARK).read_text())
    assert (mark["made_by"], mark["command"]) == ("preftune", "iterate")
    with pytest.raises(PreftuneError, match="holds a `preftune iterate` run, not a training run"):
        RunDir.checked(str(out), resume=True, overwrite=False)
    (out / "report").symlink_to(mine / "folder")  # `preftune report OUT` writes like a run file
    with pytest.raises(PreftuneError, match="report is a symbolic link"):
        write_report(out)
    (out / "report").unlink()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(PreftuneError, match="no preftune iterate run made it"):
        IterateFolder(tmp_path / "other").open({"seed": 1}, resume=True)
    folder = IterateFolder(out)
    folder.open({"seed": 1}, resume=True, say=lambda _: None)
    out.rename(tmp_path / "moved")  # deleted or moved away mid-run: the run stops, nothing is recreated
    with pytest.raises(PreftuneError, match="was deleted or moved away while the run was using it"):
        folder.write_json(folder.rounds_file, {})
    assert not out.exists()
