"""The run folder is the user's data: ownership (--overwrite deletes only what preftune wrote), no write through
a symbolic link, one run at a time (the lock), an uncreatable folder refused at once, nothing outside changed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from preftune import TrainConfig, train
from preftune.errors import PreftuneError
from preftune.outputs.lock import LOCK, RunLock
from preftune.outputs.run_dir import MARK, RunDir


def _cfg(model, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model), data=str(data), output_dir=str(out), max_steps=1, batch_size=4, progress=False,
                max_length=64, max_prompt_length=32)
    return TrainConfig(**{**base, **kw})


def _tree_hash(root) -> str:
    """Names, link targets and contents of everything under root (links are not followed)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_symlink():
            h.update(b"->" + os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def done_run(tiny_model_dir, pairs_file, tmp_path):
    """A finished run with two checkpoints, and a sibling folder of the user's to compare before/after."""
    out = tmp_path / "run"
    train(_cfg(tiny_model_dir, pairs_file, out, max_steps=2, save_steps=1))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's notes")
    (mine / "folder").mkdir()
    (mine / "folder" / "data.bin").write_bytes(b"\x00\x01" * 100)
    return out, mine


# --- ownership ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["config.yaml", "final", "checkpoints", "metrics.jsonl"])
def test_overwrite_refuses_a_folder_preftune_did_not_make(tiny_model_dir, pairs_file, tmp_path, name):
    out = tmp_path / "o"
    (out / name).parent.mkdir(parents=True)
    (out / name).mkdir() if "." not in name else (out / name).write_text("mine")
    before = _tree_hash(out)
    with pytest.raises(PreftuneError, match=f"was not made by preftune .*{MARK}"):
        train(_cfg(tiny_model_dir, pairs_file, out, overwrite=True))
    assert _tree_hash(out) == before


def test_overwrite_refuses_run_files_the_mark_does_not_list(done_run, tiny_model_dir, pairs_file):
    out, _ = done_run
    mark = json.loads((out / MARK).read_text())
    mark["names"] = [n for n in mark["names"] if n not in ("final", "config.yaml")]
    (out / MARK).write_text(json.dumps(mark))
    before = _tree_hash(out)
    with pytest.raises(PreftuneError, match="holds config.yaml, final, which preftune did not write"):
        train(_cfg(tiny_model_dir, pairs_file, out, overwrite=True))
    assert _tree_hash(out) == before


def test_overwrite_refuses_a_foreign_file_inside_checkpoints(done_run, tiny_model_dir, pairs_file):
    out, _ = done_run
    (out / "checkpoints" / "best-model").mkdir()
    with pytest.raises(PreftuneError, match="holds checkpoints/best-model, which preftune did not write"):
        train(_cfg(tiny_model_dir, pairs_file, out, overwrite=True))
    assert (out / "checkpoints" / "step-0000002").is_dir()


def test_overwrite_replaces_only_what_the_run_wrote(done_run, tiny_model_dir, pairs_file):
    out, _ = done_run
    (out / "my_notes.txt").write_text("keep me")
    (out / "plots").mkdir()
    res = train(_cfg(tiny_model_dir, pairs_file, out, overwrite=True))
    assert (out / "my_notes.txt").read_text() == "keep me" and (out / "plots").is_dir()
    assert not (out / "checkpoints").exists()  # the earlier run's checkpoints went with --overwrite
    assert res.final_dir.is_dir() and not (out / LOCK).exists()
    assert json.loads((out / MARK).read_text())["names"] == sorted(
        ["checkpoints", "config.yaml", "data_cache", "data_summary.txt", "final", "metrics.jsonl", "reference_logps",
         "report", "eval.json", "tensorboard", "wandb", "mlruns"])


def test_resume_into_an_unmarked_folder_is_refused(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "o"
    (out / "checkpoints").mkdir(parents=True)
    with pytest.raises(PreftuneError, match="was not made by preftune"):
        train(_cfg(tiny_model_dir, pairs_file, out, resume=True))


def test_damaged_mark_is_refused(done_run, tiny_model_dir, pairs_file):
    out, _ = done_run
    (out / MARK).write_text("{not json")
    with pytest.raises(PreftuneError, match="is damaged, so preftune cannot tell which files"):
        train(_cfg(tiny_model_dir, pairs_file, out, overwrite=True))


# --- symbolic links -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, flags", [
    ("metrics.jsonl", {"resume": True}),
    ("config.yaml", {"overwrite": True}),
    (".tmp-final", {"overwrite": True}),
    (".tmp-config.yaml", {"resume": True}),
    ("final", {"resume": True, "max_steps": 3}),
    ("checkpoints", {"overwrite": True}),
    ("reference_logps", {"overwrite": True}),
    ("checkpoints/step-0000009", {"resume": True}),
    ("reference_logps/train-0.safetensors", {"overwrite": True}),
    (LOCK, {"resume": True}),
])
def test_links_in_the_run_folder_are_refused_naming_them(done_run, tiny_model_dir, pairs_file, name, flags):
    """A link planted at any name a run writes, renames or deletes: refused with the link's name, the link and
    its target untouched, nothing outside the run folder changed."""
    out, mine = done_run
    link = out / name
    if link.is_dir() and not link.is_symlink():
        import shutil

        shutil.rmtree(link)
    elif link.exists():
        link.unlink()
    target = mine / "folder" if name in ("final", "checkpoints", "reference_logps") or "step-" in name else \
        mine / "notes.txt"
    link.symlink_to(target)
    before = _tree_hash(mine)
    with pytest.raises(PreftuneError, match=f"{link} is a symbolic link .*never writes, renames or deletes"):
        train(_cfg(tiny_model_dir, pairs_file, out, **flags))
    assert link.is_symlink() and _tree_hash(mine) == before


def test_a_link_planted_during_the_run_is_refused_before_the_save(tiny_model_dir, pairs_file, tmp_path):
    from preftune.callbacks import Callback

    out, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()

    class Plant(Callback):
        def on_step_end(self, state):
            (out / ".tmp-final").symlink_to(outside)

    with pytest.raises(PreftuneError, match=r"\.tmp-final is a symbolic link"):
        train(_cfg(tiny_model_dir, pairs_file, out), callbacks=[Plant()])
    assert list(outside.iterdir()) == [] and not (out / LOCK).exists()


def test_a_killed_runs_temporaries_are_removed_and_a_users_stay(done_run, tiny_model_dir, pairs_file):
    out, _ = done_run
    (out / ".tmp-final").mkdir()
    (out / ".tmp-final" / "model.safetensors").write_bytes(b"half")
    (out / "checkpoints" / ".tmp-step-0000003").mkdir()
    (out / ".tmp-notes.txt").write_text("the user's")
    train(_cfg(tiny_model_dir, pairs_file, out, resume=True, max_steps=3))
    assert not (out / ".tmp-final").exists() and not (out / "checkpoints" / ".tmp-step-0000003").exists()
    assert (out / ".tmp-notes.txt").read_text() == "the user's"


def test_output_dir_itself_may_be_a_link(tiny_model_dir, pairs_file, tmp_path):
    """The folder named by --output-dir may be a link (runs/ → /scratch/...): the user chose where it points."""
    real = tmp_path / "scratch"
    real.mkdir()
    (tmp_path / "run").symlink_to(real)
    train(_cfg(tiny_model_dir, pairs_file, tmp_path / "run"))
    assert (real / "final").is_dir()


# --- uncreatable output folder --------------------------------------------------------------------------------

def test_uncreatable_output_dir_is_one_sentence_before_loading(tiny_model_dir, pairs_file, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(PreftuneError, match="cannot create output_dir .*afile is a file, not a folder"):
        RunDir.checked(str(tmp_path / "afile" / "sub" / "run"), resume=None, overwrite=False)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(PreftuneError, match="is a link to a missing folder"):
        RunDir.checked(str(tmp_path / "dangling"), resume=None, overwrite=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_parent_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(PreftuneError, match="is not writable"):
        RunDir.checked(str(ro / "run"), resume=None, overwrite=False)


def test_mkdir_failure_is_one_sentence(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    run = RunDir.checked(str(tmp_path / "run"), resume=None, overwrite=False)
    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(PreftuneError, match="cannot create output_dir .*Permission denied"):
        run.create(clear=False)


# --- the lock -------------------------------------------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _plant_lock(out, **info):
    """A lock as this process would write it (alive), changed by `info`."""
    from preftune.outputs.lock import _me

    holder = {**_me(), "since": "earlier", "token": "x", **info}
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK).write_text(json.dumps(holder))


def test_stale_lock_of_a_dead_process_is_taken_over(done_run, tiny_model_dir, pairs_file, capsys):
    out, _ = done_run
    pid = _dead_pid()
    _plant_lock(out, pid=pid)
    train(_cfg(tiny_model_dir, pairs_file, out, resume=True, max_steps=3))
    assert f"removed a stale lock of process {pid}" in capsys.readouterr().out
    assert not (out / LOCK).exists()


def test_stale_lock_of_a_reused_pid_is_taken_over(done_run, tiny_model_dir, pairs_file):
    """Our own PID with another start time: the PID was reused, the locking run is gone."""
    out, _ = done_run
    _plant_lock(out, start="1")
    train(_cfg(tiny_model_dir, pairs_file, out, resume=True, max_steps=3))


@pytest.mark.parametrize("info, needle", [
    ({}, "in use by another preftune run \\(process \\d+ on this machine"),  # this very process: alive
    ({"host": "node-17", "pid": 1}, "process 1 on host node-17.*delete .*preftune.lock"),
    ({"pidns": "pid:[1]", "pid": 1}, "in use by another preftune run"),  # another container: cannot tell
    ({"boot": "another-boot"}, "in use by another preftune run"),  # before a reboot, or another machine
])
def test_live_or_unknowable_lock_refuses_the_run(done_run, tiny_model_dir, pairs_file, info, needle):
    out, _ = done_run
    _plant_lock(out, **info)
    before = _tree_hash(out)
    with pytest.raises(PreftuneError, match=needle):
        train(_cfg(tiny_model_dir, pairs_file, out, resume=True, max_steps=3))
    assert _tree_hash(out) == before  # the other run's lock and files untouched


@pytest.mark.parametrize("info", [{"host": "node-17", "pid": 1}, {"boot": "another-boot"}, {"pidns": "pid:[1]"}],
                         ids=["other-host", "before-a-reboot", "other-container"])
def test_a_silent_lock_from_elsewhere_is_taken_over(done_run, tiny_model_dir, pairs_file, capsys, info):
    """A lock whose process cannot be checked from here (a requeued job's node died) is stale once it has not
    been refreshed for STALE_AFTER_S; its age is its file time, set back here instead of waiting."""
    from preftune.outputs.lock import STALE_AFTER_S

    out, _ = done_run
    _plant_lock(out, **info)
    old = (out / LOCK).stat().st_mtime - STALE_AFTER_S - 60
    os.utime(out / LOCK, (old, old))
    train(_cfg(tiny_model_dir, pairs_file, out, resume=True, max_steps=3))
    assert "(not refreshed for 11 minutes)" in capsys.readouterr().out


def test_a_held_lock_is_refreshed_and_released(tmp_path):
    lock = RunLock(tmp_path / LOCK)
    lock.acquire()
    assert lock._beat is not None and lock._beat.is_alive()
    os.utime(tmp_path / LOCK, (0, 0))
    assert lock.age() > 1e6
    lock.touch()  # what the heartbeat thread does every HEARTBEAT_S
    assert lock.age() < 60
    lock.release()
    assert lock._beat is None and not (tmp_path / LOCK).exists()


def test_release_never_removes_another_runs_lock(tmp_path):
    lock = RunLock(tmp_path / LOCK)
    lock.acquire()
    (tmp_path / LOCK).write_text(json.dumps({"pid": 1, "token": "someone else"}))
    lock.release()
    assert (tmp_path / LOCK).exists()


# --- nothing outside changes ----------------------------------------------------------------------------------

def test_hostile_cases_change_nothing_outside_the_run_folder(done_run, tiny_model_dir, pairs_file):
    """A sibling folder, hashed before and after a series of refused and accepted runs on the run folder."""
    out, mine = done_run
    before = _tree_hash(mine)
    cases = [dict(overwrite=True), dict(resume=True, beta=0.5), dict(resume=True, max_steps=3)]
    for kw in cases:
        try:
            train(_cfg(tiny_model_dir, pairs_file, out, **kw))
        except PreftuneError:
            pass
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").symlink_to(mine / "notes.txt")
    with pytest.raises(PreftuneError):
        train(_cfg(tiny_model_dir, pairs_file, out, resume=True, max_steps=4))
    assert _tree_hash(mine) == before


# --- issue 26: the folder's record, a finished run, a folder gone mid-run -------------------------------------

def test_config_paths_are_absolute_and_the_models_loaded_are_recorded(tmp_path, monkeypatch):
    """config.yaml holds every local path absolute (a later `eval RUN/final` from another directory finds the same
    model), a hub name and a glob of local files as meant; the mark keeps the models' identities; data_cache_dir
    inside the run folder is refused before anything is written."""
    import yaml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    (tmp_path / "d.jsonl").write_text("")
    run = RunDir.checked("out", resume=None, overwrite=False)
    run.create(clear=False, say=lambda s: None)
    try:
        run.write_config({"model": "base", "data": ["d.jsonl", "org/dataset"], "eval_data": "*.jsonl",
                          "reference_model": None, "output_dir": "out", "beta": 0.1}, {"model": "ID"}, "loaded")
    finally:
        run.release()
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text()) == {
        "model": str(tmp_path / "base"), "data": [str(tmp_path / "d.jsonl"), "org/dataset"],
        "eval_data": str(tmp_path / "*.jsonl"), "reference_model": None, "output_dir": str(tmp_path / "out"),
        "beta": 0.1}
    assert run.recorded("models") == {"model": {"path": str(tmp_path / "base"), "identity": "ID"},
                                      "reference_model": None}
    with pytest.raises(PreftuneError, match="data_cache_dir new/cache is inside output_dir new; leave"):
        RunDir.checked("new", resume=None, overwrite=False, cache="new/cache")
    assert not (tmp_path / "new").exists()


def test_which_resume_has_nothing_to_do(tmp_path):
    """A finished run (a whole final/, the step it was written at in the mark): --resume auto has nothing to do
    unless a checkpoint is newer (a run trained on from it and stopped); --resume true has nothing to do when
    there is no checkpoint to continue from; no --resume, or a checkpoint path, always trains."""
    run, said = RunDir(tmp_path), []
    assert not run.finished("auto", said.append)  # no final/
    (tmp_path / "final").mkdir()
    (tmp_path / MARK).write_text(json.dumps({"names": [], "finished_step": 4}))
    assert run.finished("auto", said.append) and run.finished(True, said.append)
    assert said[0] == (f"output_dir {tmp_path} holds a finished run (final/ of step 4): nothing to resume; pass "
                       "--overwrite to train again from the start, or another --output-dir.")
    assert not any(run.finished(r, said.append) for r in (None, False, str(tmp_path / "checkpoints" / "x")))
    (tmp_path / "checkpoints" / "step-0000004").mkdir(parents=True)
    assert run.finished("auto", said.append) and not run.finished(True, said.append)
    (tmp_path / "checkpoints" / "step-0000006").mkdir()
    assert not run.finished("auto", said.append)


def test_a_run_folder_deleted_during_the_run_is_not_made_again(tiny_model_dir, pairs_file, tmp_path):
    """`rm -rf RUN` while the run trains: the next write finds its lock gone and stops in one sentence; nothing
    recreates a partial folder without its mark."""
    import shutil

    from preftune.callbacks import Callback

    out = tmp_path / "run"

    class Remove(Callback):
        def on_step_end(self, state):
            shutil.rmtree(out)

    with pytest.raises(PreftuneError, match="was deleted or moved away while the run was using it"):
        train(_cfg(tiny_model_dir, pairs_file, out, max_steps=3, save_steps=1), callbacks=[Remove()])
    assert not out.exists()
