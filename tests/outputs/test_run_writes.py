"""A run writes only inside its output folder (issue 16: the old check walked a folder that held neither the
data nor the model, so a run writing next to its data file passed)."""

from __future__ import annotations

import shutil
from pathlib import Path

from helpers import make_pairs, write_jsonl

from preftune import TrainConfig, train


def _snapshot(root: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_run_writes_only_inside_output_dir(tiny_model_dir, tmp_path):
    """Data, eval data and model live in non-empty folders under tmp_path beside the output folder. After a run
    that writes everything a run can write (reference cache, checkpoints, eval, final/), every new or changed
    path under tmp_path is inside the output folder, and the output folder did get those files (so the check
    is not vacuous)."""
    data_dir, model_dir, out = tmp_path / "data", tmp_path / "model", tmp_path / "out"
    data_dir.mkdir()
    (data_dir / "README.txt").write_text("the user's own file")
    data = write_jsonl(data_dir / "train.jsonl", make_pairs(16, seed=41))
    held = write_jsonl(data_dir / "held.jsonl", make_pairs(8, seed=42))
    shutil.copytree(tiny_model_dir, model_dir)
    before = _snapshot(tmp_path)

    train(TrainConfig(model=str(model_dir), data=str(data), eval_data=str(held), output_dir=str(out),
                      max_steps=2, batch_size=4, save_steps=1, eval_steps=1, progress=False, max_length=64,
                      max_prompt_length=32))

    after = _snapshot(tmp_path)
    changed = {p for p in after if before.get(p) != after[p]} | (before.keys() - after.keys())
    outside = sorted(str(p.relative_to(tmp_path)) for p in changed if out != p and out not in p.parents)
    assert outside == [], outside
    written = {p.relative_to(out).parts[0] for p in changed if out in p.parents}
    assert {"reference_logps", "checkpoints", "final", "metrics.jsonl", "config.yaml"} <= written
