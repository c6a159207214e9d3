"""A full disk at every place a run writes: one sentence, the previous state intact, no `.tmp-*` left, and the
run continues once space is freed.

Two ways to fill the disk, the same cases for both:
- `tmpfs`: a real 32 MiB tmpfs (when the tests run as root and may mount one); at the chosen moment a filler
  file takes every free byte, so the next write meets the kernel's ENOSPC, raised in whatever form the writer
  (safetensors, torch.save's C++ writer, Python's file objects) gives it;
- `simulated`: everywhere, the writer of that site raises what it raises on a full disk after writing part of its
  file (safetensors: SafetensorError "os error 28"; torch.save: RuntimeError "unexpected pos" with no errno, the
  disk reporting 0 bytes free; Python: OSError ENOSPC).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from preftune import TrainConfig, train
from preftune.callbacks import Callback
from preftune.errors import PreftuneError
from preftune.outputs.manifest import damage
from preftune.outputs.metrics import read_metrics

MIB = 1 << 20


class Disk:
    """Fills and frees the disk under a run folder, for real (tmpfs) or by making the site's writer fail."""

    def __init__(self, root, mode, monkeypatch):
        self.root, self.mode, self.full = root, mode, False
        if mode == "simulated":
            self._patch_writers(monkeypatch)

    def fill(self) -> None:
        self.full = True
        if self.mode == "tmpfs":
            with open(self.root / "filler", "ab", buffering=0) as f:
                for size in (MIB, 1 << 16, 1 << 12, 1):
                    try:
                        while True:
                            f.write(b"\0" * size)
                    except OSError as e:
                        assert e.errno == errno.ENOSPC

    def free(self) -> None:
        self.full = False
        if self.mode == "tmpfs":
            (self.root / "filler").unlink()

    def _patch_writers(self, monkeypatch) -> None:
        import safetensors.torch
        from safetensors import SafetensorError
        from transformers import PreTrainedModel

        import preftune.modeling.precomputed as reference  # the reference cache is written there
        import preftune.outputs.checkpoint as checkpoint
        import preftune.outputs.run_dir as run_dir

        disk = self

        def failing(real, error, partial):
            def write(*a, **k):
                target = partial(*a, **k)
                # torch.distributed.checkpoint serialises into memory buffers first: only files can fill a disk
                if not disk.full or not isinstance(target, Path):
                    return real(*a, **k)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(b"\0" * 100)  # what a writer leaves when the disk fills half-way
                raise error()
            return write

        st_error = lambda: SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")  # noqa: E731
        enospc = lambda: OSError(errno.ENOSPC, "No space left on device")  # noqa: E731
        tmp_of = lambda path, *a, **k: path.with_name(".tmp-" + path.name)  # noqa: E731
        monkeypatch.setattr(run_dir, "replace_text", failing(run_dir.replace_text, enospc, tmp_of))
        real_write = os.write

        def half_write(fd, data):  # an append cut short by the full disk (append_text must cut it back)
            if not disk.full:
                return real_write(fd, data)
            real_write(fd, data[: len(data) // 2])
            raise enospc()

        monkeypatch.setattr(run_dir.os, "write", half_write)
        monkeypatch.setattr(reference, "save_file", failing(safetensors.torch.save_file, st_error,
                                                            lambda t, path, *a, **k: Path(path)))
        monkeypatch.setattr(checkpoint.torch, "save", failing(
            torch.save, lambda: RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
            lambda obj, path, *a, **k: Path(path) if isinstance(path, (str, os.PathLike)) else path))
        real_usage = shutil.disk_usage
        monkeypatch.setattr(run_dir.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=0) if disk.full
                            else real_usage(p))
        monkeypatch.setattr(PreTrainedModel, "save_pretrained", failing(
            PreTrainedModel.save_pretrained, enospc, lambda self, d, *a, **k: Path(d) / "model.safetensors"))


def _tmpfs_available() -> str | None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "mounting a tmpfs needs root"
    return None


@pytest.fixture(params=["tmpfs", "simulated"])
def disk(request, tmp_path, monkeypatch):
    root = tmp_path / "disk"
    root.mkdir()
    if request.param == "tmpfs":
        why = _tmpfs_available()
        if why is None:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(root)], capture_output=True,
                               text=True)
            why = r.stderr.strip() if r.returncode else None
        if why:
            pytest.skip(f"no real full disk here ({why}); the simulated cases cover every site")
    try:
        yield Disk(root, request.param, monkeypatch)
    finally:
        if request.param == "tmpfs":
            subprocess.run(["umount", str(root)], check=False)


def _cfg(model, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model), data=str(data), output_dir=str(out), batch_size=4, progress=False, max_steps=3,
                max_length=64, max_prompt_length=32, save_steps=1, learning_rate=1e-3)
    return TrainConfig(**{**base, **kw})


class FillAt(Callback):
    """Fills the disk at one event of the run."""

    def __init__(self, disk, event, step):
        self.disk, self.event, self.step = disk, event, step

    def _maybe(self, event, step):
        if (event, step) == (self.event, self.step) and not self.disk.full:
            self.disk.fill()

    def on_step_end(self, state):
        self._maybe("step", state.step)

    def on_log(self, state, row):
        self._maybe("log", state.step)

    def on_save(self, state, path):
        self._maybe("save", state.step)


def _no_temporaries(out):
    left = [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    assert not left, left


def _fill_before(monkeypatch, disk, module, name):
    """Fill the disk right before `module.name` runs (for sites before the first callback)."""
    real = getattr(module, name)

    def wrapped(*a, **k):
        disk.fill()
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapped)
    return real


def test_full_disk_at_the_checkpoint_keeps_the_previous_and_resumes(disk, tiny_model_dir, pairs_file):
    out = disk.root / "run"
    with pytest.raises(PreftuneError, match=r"^the disk filled while writing the checkpoint of step 2 in .*"
                                            r"the previous checkpoints are intact; no partial file was left behind: "
                                            r"free space and continue with --resume\.$"):
        train(_cfg(tiny_model_dir, pairs_file, out), callbacks=[FillAt(disk, "log", 2)])
    _no_temporaries(out)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000001"]
    assert damage(out / "checkpoints" / "step-0000001") is None
    assert not (out / ".preftune.lock").exists()
    disk.free()
    res = train(_cfg(tiny_model_dir, pairs_file, out, resume=True))
    assert [r["step"] for r in read_metrics(res.output_dir)] == [1, 2, 3] and res.final_dir.is_dir()


@pytest.mark.parametrize("save_steps, kept, then", [
    (1, r"the trained weights of step 3 are kept in .*step-0000003", "run the same command with --resume to "
                                                                      "write final/"),
    (0, r"no checkpoint could be kept, so the trained weights are lost \(--save-steps N keeps checkpoints\)",
     "train again"),
])
def test_full_disk_at_final_says_where_the_weights_are(disk, tiny_model_dir, pairs_file, save_steps, kept, then):
    out = disk.root / "run"
    event = ("save", 3) if save_steps else ("log", 3)
    with pytest.raises(PreftuneError, match=rf"the disk filled while writing final/ in .*; {kept}; .*free space and "
                                            rf"{then}\.$"):
        train(_cfg(tiny_model_dir, pairs_file, out, save_steps=save_steps), callbacks=[FillAt(disk, *event)])
    _no_temporaries(out)
    assert not (out / "final").exists()
    if save_steps:
        disk.free()
        res = train(_cfg(tiny_model_dir, pairs_file, out, save_steps=save_steps, resume=True))
        assert res.final_dir.is_dir() and [r["step"] for r in read_metrics(out)] == [1, 2, 3]


def test_full_disk_at_final_rescues_the_weights_as_a_checkpoint(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    """final/ fails but a checkpoint still fits (as with LoRA --merge-lora, whose final/ is the whole model): the
    weights of the last step are saved as a checkpoint, and --resume writes final/ with exactly those weights:
    bit-identical to an uninterrupted run of the same config (same process, same machine)."""
    from safetensors.torch import load_file
    from transformers import PreTrainedModel

    real = PreTrainedModel.save_pretrained

    def full(self, folder, *a, **k):
        Path(folder).mkdir()
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    out = tmp_path / "run"
    with pytest.raises(PreftuneError, match="trained weights of step 3 are kept in .*step-0000003"):
        train(_cfg(tiny_model_dir, pairs_file, out, save_steps=0))
    _no_temporaries(out)
    assert damage(out / "checkpoints" / "step-0000003") is None
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real)
    res = train(_cfg(tiny_model_dir, pairs_file, out, save_steps=0, resume=True))
    plain = train(_cfg(tiny_model_dir, pairs_file, tmp_path / "plain", save_steps=0))
    final, expected = load_file(str(res.final_dir / "model.safetensors")), load_file(str(plain.final_dir / "model.safetensors"))
    for name, t in expected.items():
        assert torch.equal(final[name], t), name


def test_full_disk_at_metrics_keeps_whole_lines(disk, tiny_model_dir, pairs_file):
    # A real filesystem allocates whole pages: an append that fits in the file's last page still succeeds on a
    # full disk, so on the tmpfs the disk is filled before the first line (a new page); simulated, before the
    # second (the first must stay whole).
    step = 1 if disk.mode == "tmpfs" else 2
    out = disk.root / "run"
    with pytest.raises(PreftuneError, match=r"the disk filled while writing metrics.jsonl .*the lines before are "
                                            r"intact; .*continue with --resume"):
        train(_cfg(tiny_model_dir, pairs_file, out, save_steps=0), callbacks=[FillAt(disk, "step", step)])
    _no_temporaries(out)
    assert [r["step"] for r in read_metrics(out)] == list(range(1, step))  # the failed line cut back, not half-written


def test_full_disk_at_the_reference_cache(disk, tiny_model_dir, pairs_file, monkeypatch):
    import preftune.modeling.precomputed as reference  # the reference cache is written there

    out = disk.root / "run"
    real = _fill_before(monkeypatch, disk, reference, "save_file")
    with pytest.raises(PreftuneError, match=r"the disk filled while writing the reference log-probs cache in .*"
                                            r"nothing else was changed"):
        train(_cfg(tiny_model_dir, pairs_file, out))
    _no_temporaries(out)
    assert list((out / "reference_logps").iterdir()) == []
    disk.free()
    monkeypatch.setattr(reference, "save_file", real)
    assert train(_cfg(tiny_model_dir, pairs_file, out, overwrite=True)).final_dir.is_dir()


def test_full_disk_at_config_yaml(disk, tiny_model_dir, pairs_file, monkeypatch):
    from preftune.outputs import run_dir

    out = disk.root / "run"
    real_create = run_dir.RunDir.create

    def create_then_fill(self, **kw):
        real_create(self, **kw)
        disk.fill()

    monkeypatch.setattr(run_dir.RunDir, "create", create_then_fill)
    with pytest.raises(PreftuneError, match=r"the disk filled while writing config.yaml in .*free space and run "
                                            r"again with --overwrite\.$"):
        train(_cfg(tiny_model_dir, pairs_file, out))
    _no_temporaries(out)
    assert not (out / "config.yaml").exists() and not (out / ".preftune.lock").exists()
    disk.free()
    monkeypatch.setattr(run_dir.RunDir, "create", real_create)
    assert train(_cfg(tiny_model_dir, pairs_file, out, overwrite=True)).final_dir.is_dir()


def test_full_disk_from_the_command_line_is_one_line_exit_2(tiny_model_dir, pairs_file, tmp_path, monkeypatch,
                                                            capsys):
    from preftune.cli import main

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--output-dir",
                 str(tmp_path / "o"), "--max-steps", "2", "--save-steps", "1", "--max-length", "64",
                 "--max-prompt-length", "32", "--progress", "false"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "the disk filled while writing the checkpoint for step 1" in err or "disk filled" in err
