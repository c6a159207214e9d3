"""Checkpoint folders on a two-weight toy model: what is written, what is kept, what resume finds and loads."""

from __future__ import annotations

import json

import pytest
import torch

from preftune.config import TrainConfig
from preftune.errors import PreftuneError
from preftune.outputs.checkpoint import list_checkpoints, load_checkpoint, pick_checkpoint, save_checkpoint


def _toy():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[1].weight.requires_grad_(False)  # frozen: not a trainable weight, not saved
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return model, opt, sched


def _save(run, step, model, opt, sched, keep=2, **kw):
    return save_checkpoint(run, step, model=model, optimizer=opt, scheduler=sched, trainer_state={"x": step},
                           reference_cache=kw.pop("reference_cache", None), keep=keep, **kw)


def test_contents_trainable_weights_state_and_copies(tmp_path):
    """One checkpoint holds the trainable weights only (0.weight, 0.bias, 1.bias; not the frozen 1.weight) in
    its DCP state/ with the optimizer, the step and trainer state, the scheduler, the RNG of each process, and
    copies of the given files; the reference cache is linked in (same bytes). Loaded into a fresh toy model,
    the weights come back exactly."""
    from preftune.outputs.checkpoint import _safe_reader

    model, opt, sched = _toy()
    metrics, cache = tmp_path / "metrics.jsonl", tmp_path / "ref.safetensors"
    metrics.write_text('{"step": 1}\n')
    cache.write_bytes(b"cache bytes")
    path = _save(tmp_path / "run", 3, model, opt, sched, copies=(metrics, tmp_path / "absent.yaml"),
                 reference_cache=cache)
    assert path.name == "step-0000003"
    saved = {k for k in _safe_reader(path / "state").read_metadata().state_dict_metadata if k.startswith("model.")}
    assert saved == {"model.0.weight", "model.0.bias", "model.1.bias"}
    assert (path / "scheduler.pt").is_file() and (path / "rng" / "rank-00000.pt").is_file()
    assert json.loads((path / "trainer_state.json").read_text()) == {"step": 3, "x": 3}
    assert (path / "metrics.jsonl").read_text() == '{"step": 1}\n' and not (path / "absent.yaml").exists()
    assert (path / "ref.safetensors").read_bytes() == b"cache bytes"
    fresh, fresh_opt, fresh_sched = _toy()
    with torch.no_grad():
        fresh[0].weight.add_(1.0)  # differs from the saved weights until loaded
    load_checkpoint(path, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    torch.testing.assert_close(fresh[0].weight, model[0].weight, atol=0, rtol=0)


def test_keeps_the_last_k_and_zero_keeps_all(tmp_path):
    model, opt, sched = _toy()
    for step in (1, 2, 3, 4):
        _save(tmp_path / "a", step, model, opt, sched, keep=2)
        _save(tmp_path / "b", step, model, opt, sched, keep=0)
    assert [p.name for p in list_checkpoints(tmp_path / "a")] == ["step-0000003", "step-0000004"]
    assert len(list_checkpoints(tmp_path / "b")) == 4


def test_pick_checkpoint(tmp_path):
    """No resume → None; True → the newest whole one (a half-written folder is named and passed over); a
    path → that folder; no checkpoint or a folder that is not one → one sentence. The spellings YAML and flags
    may hand over are read once, by the config."""
    run = tmp_path / "run"
    assert pick_checkpoint(run, False) is None and pick_checkpoint(run, None) is None
    with pytest.raises(PreftuneError, match="found no checkpoint"):
        pick_checkpoint(run, True)
    model, opt, sched = _toy()
    first = _save(run, 5, model, opt, sched)
    newest = _save(run, 12, model, opt, sched)
    (run / "checkpoints" / "step-0000099").mkdir()  # no manifest: a half-written folder
    said: list[str] = []
    assert pick_checkpoint(run, True, said.append) == newest
    assert said[0].startswith("resuming from step-0000012") and "step-0000099 is damaged" in said[0]
    resume = [TrainConfig(resume=v).resume for v in ("true", "True", "latest", "", "false", "False")]
    assert resume == [True, True, True, False, False, False]
    assert [pick_checkpoint(run, v, said.append) for v in resume] == [newest, newest, newest, None, None, None]
    assert pick_checkpoint(run, str(first)) == first
    with pytest.raises(PreftuneError, match="not a preftune checkpoint"):
        pick_checkpoint(run, str(tmp_path))


def test_load_restores_weights_optimizer_and_schedule(tmp_path):
    """Two AdamW steps (lr factor 1/(s+1)), save, take a third: a fresh model loaded from the checkpoint takes the
    same third step (same weights after it), which needs weights, AdamW moments and the schedule's step."""
    model, opt, sched = _toy()

    def step(m, o, s):
        o.zero_grad()
        m(torch.tensor([[1.0, -2.0]])).sum().backward()
        o.step()
        s.step()

    for _ in range(2):
        step(model, opt, sched)
    path = _save(tmp_path, 2, model, opt, sched)
    step(model, opt, sched)

    fresh, fopt, fsched = _toy()
    state = load_checkpoint(path, model=fresh, optimizer=fopt, scheduler=fsched)
    assert state == {"step": 2, "x": 2}
    assert fsched.last_epoch == 2
    step(fresh, fopt, fsched)
    for a, b in zip(model.parameters(), fresh.parameters()):
        torch.testing.assert_close(b, a, atol=0, rtol=0)


def test_load_refuses_a_checkpoint_of_another_model(tmp_path):
    model, opt, sched = _toy()
    path = _save(tmp_path, 1, model, opt, sched)
    other = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1), torch.nn.Linear(1, 1))
    o = torch.optim.AdamW(other.parameters())
    with pytest.raises(PreftuneError, match="does not match this model"):
        load_checkpoint(path, model=other, optimizer=o, scheduler=torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1))


def test_a_stale_temporary_folder_is_replaced(tmp_path):
    """A crash mid-write leaves .tmp-step-N behind; the next save of step N starts from an empty folder."""
    model, opt, sched = _toy()
    stale = tmp_path / "checkpoints" / ".tmp-step-0000001"
    stale.mkdir(parents=True)
    (stale / "junk.bin").write_bytes(b"half-written")
    path = _save(tmp_path, 1, model, opt, sched)
    assert not (path / "junk.bin").exists() and not stale.exists()


class Payload:
    """Any class: unpickling it means running code named by the file (here it only records that it ran)."""

    unpickled = False

    def __setstate__(self, state):
        Payload.unpickled = True


def test_state_files_are_read_without_unpickling_objects(tmp_path):
    """scheduler.pt is read with weights_only=True, and the DCP metadata with an unpickler that knows only
    checkpoint classes: a file that names another class (here a harmless one; a malicious file would name
    os.system) is refused instead of unpickled."""
    import pickle

    model, opt, sched = _toy()
    path = _save(tmp_path, 1, model, opt, sched)
    state = torch.load(path / "scheduler.pt", weights_only=True)
    torch.save({**state, "extra": Payload()}, path / "scheduler.pt")
    with pytest.raises(PreftuneError, match=r"could not be loaded \(Weights only load failed"):
        load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)

    path = _save(tmp_path, 2, model, opt, sched)
    metadata = path / "state" / ".metadata"
    metadata.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(PreftuneError, match=r"names .*Payload, which no checkpoint holds; it was not read"):
        load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)
    assert not Payload.unpickled


def test_reference_cache_is_copied_where_it_cannot_be_linked(tmp_path, monkeypatch):
    """A hard link fails across file systems; the cache is then copied into the checkpoint."""
    import os

    def no_link(src, dst):
        raise OSError("Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    model, opt, sched = _toy()
    cache = tmp_path / "train-abc.safetensors"
    cache.write_bytes(b"reference log-probs")
    path = _save(tmp_path / "run", 1, model, opt, sched, reference_cache=cache)
    assert (path / "train-abc.safetensors").read_bytes() == b"reference log-probs"


def test_full_disk_while_creating_the_folder(tmp_path, monkeypatch):
    """ENOSPC already at the temporary folder's mkdir: the run folder's one sentence, not a FileNotFoundError
    from the clean-up of a folder that was never made."""
    import errno
    from pathlib import Path

    from preftune.outputs.run_dir import RunDir

    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if self.name.startswith(".tmp-step"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    model, opt, sched = _toy()
    with pytest.raises(PreftuneError, match="disk filled while writing the checkpoint of step 1"):
        with RunDir(tmp_path).saving("the checkpoint of step 1"):
            _save(tmp_path, 1, model, opt, sched)
