"""Checkpoint manifests: every file's size and SHA-256; a damaged checkpoint is reported and the newest intact one
is used (or, named explicitly, refused while naming the intact one)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from preftune import TrainConfig, train
from preftune.errors import PreftuneError
from preftune.outputs.checkpoint import pick_checkpoint, save_checkpoint
from preftune.outputs.manifest import MANIFEST, damage, write_manifest
from preftune.outputs.metrics import read_metrics


def _three_checkpoints(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    kw = dict(model=model, optimizer=opt, scheduler=sched, trainer_state={}, reference_cache=None, keep=0)
    return [save_checkpoint(tmp_path, step, **kw) for step in (1, 2, 3)]


def _truncate(p):
    p.write_bytes(p.read_bytes()[:-7])


def _flip_a_byte(p):
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


def _drop_manifest(p):  # p is the checkpoint folder's scheduler.pt: its folder was never finished
    (p.parent / MANIFEST).unlink()


def _link(p):
    other = p.parent.parent / "elsewhere.pt"
    other.write_bytes(p.read_bytes())
    p.unlink()
    p.symlink_to(other)


@pytest.mark.parametrize("spoil, why", [
    (_truncate, r"scheduler.pt has [\d,]+ bytes instead of [\d,]+"),
    (_flip_a_byte, "scheduler.pt does not match its recorded SHA-256"),
    (lambda p: p.unlink(), "scheduler.pt is missing"),
    (_drop_manifest, "it has no manifest.json, so it was never completely written"),
    (_link, "scheduler.pt is a symbolic link"),
], ids=["truncated", "flipped-byte", "missing-file", "unfinished", "link"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, spoil, why):
    cks = _three_checkpoints(tmp_path)
    assert [damage(c) for c in cks] == [None, None, None]
    spoil(cks[2] / "scheduler.pt")
    said = []
    assert pick_checkpoint(tmp_path, True, said.append) == cks[1]
    assert len(said) == 1 and said[0].startswith("resuming from step-0000002, the newest intact checkpoint")
    assert re.search(why, said[0]), said


def test_every_checkpoint_damaged_is_refused_listing_each(tmp_path):
    cks = _three_checkpoints(tmp_path)
    for c in cks:
        _truncate(c / "state" / "__0_0.distcp")
    with pytest.raises(PreftuneError, match="no intact checkpoint in .*step-0000003 is damaged .*step-0000001 is "
                                            "damaged"):
        pick_checkpoint(tmp_path, True)


def test_explicit_damaged_checkpoint_is_refused_offering_an_intact_one(tmp_path):
    cks = _three_checkpoints(tmp_path)
    _flip_a_byte(cks[1] / "trainer_state.json")
    with pytest.raises(PreftuneError, match=f"checkpoint {cks[1]} is damaged .*resume from {cks[2]} instead"):
        pick_checkpoint(tmp_path, str(cks[1]))
    assert pick_checkpoint(tmp_path, str(cks[0])) == cks[0]


def test_a_manifest_cannot_point_outside_its_folder(tmp_path):
    cks = _three_checkpoints(tmp_path)
    m = json.loads((cks[2] / MANIFEST).read_text())
    m["files"]["../../secret"] = {"size": 1, "sha256": "0"}
    (cks[2] / MANIFEST).write_text(json.dumps(m))
    assert "names a file outside it" in damage(cks[2])
    (cks[2] / MANIFEST).write_text("[1, 2]")
    assert "unreadable" in damage(cks[2])


def test_manifest_lists_every_file_with_its_hash(tmp_path):
    import hashlib

    folder = tmp_path / "ck"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"abc")
    (folder / "sub" / "shard-1.safetensors").write_bytes(b"x" * 5000)
    write_manifest(folder)
    files = json.loads((folder / MANIFEST).read_text())["files"]
    # sha256("abc") is the FIPS 180-2 test vector ba7816bf...
    assert files["a.bin"] == {"size": 3, "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
    assert files["sub/shard-1.safetensors"]["sha256"] == hashlib.sha256(b"x" * 5000).hexdigest()
    assert damage(folder) is None


def _cfg(model, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model), data=str(data), output_dir=str(out), batch_size=4, progress=False,
                max_length=64, max_prompt_length=32, save_steps=1, save_total_limit=3, learning_rate=1e-3)
    return TrainConfig(**{**base, **kw})


def test_resume_skips_a_corrupt_checkpoint_and_says_so(tiny_model_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "run"
    train(_cfg(tiny_model_dir, pairs_file, out, max_steps=3))
    _truncate(out / "checkpoints" / "step-0000003" / "state" / "__0_0.distcp")
    capsys.readouterr()
    res = train(_cfg(tiny_model_dir, pairs_file, out, max_steps=4, resume=True))
    said = capsys.readouterr().out
    assert "resuming from step-0000002, the newest intact checkpoint: step-0000003 is damaged" in said
    assert "resumed from" in said and "at step 2" in said
    assert [r["step"] for r in read_metrics(res.output_dir)] == [1, 2, 3, 4]
    assert damage(out / "checkpoints" / "step-0000003") is None  # written again, whole


def test_intact_but_unloadable_checkpoint_is_one_sentence(tiny_model_dir, pairs_file, tmp_path):
    """Files that match their manifest but are not what this version reads (another layout): a sentence."""
    out = tmp_path / "run"
    train(_cfg(tiny_model_dir, pairs_file, out, max_steps=2))
    ck = out / "checkpoints" / "step-0000002"
    (ck / "scheduler.pt").write_bytes(b"not a torch file")
    write_manifest(ck)
    with pytest.raises(PreftuneError, match="checkpoint .*step-0000002 could not be loaded"):
        train(_cfg(tiny_model_dir, pairs_file, out, max_steps=3, resume=True))
