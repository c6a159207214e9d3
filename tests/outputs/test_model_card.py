"""final/README.md parses with huggingface_hub's ModelCard and says how the model was made."""

from __future__ import annotations

import hashlib
import shutil
from types import SimpleNamespace

from huggingface_hub import ModelCard

from preftune import TrainConfig
from preftune.outputs.model_card import ModelCardCallback, card_text, hub_base_model, write_model_card_for_run


def test_card_of_a_run_parses_and_names_data_and_settings(tiny_dpo_run, tmp_path, pairs_file):
    run = tmp_path / "run"
    shutil.copytree(tiny_dpo_run, run)
    card = ModelCard.load(write_model_card_for_run(run))
    assert card.data.library_name == "transformers" and card.data.tags == ["preftune", "dpo"]
    assert card.data.base_model is None  # a local folder is no hub id: named in the text instead
    text = card.text
    sha = hashlib.sha256(pairs_file.read_bytes()).hexdigest()
    assert f"| {pairs_file} | 64 | {sha} |" in text
    assert "| beta | 0.1 |" in text and "| loss | sigmoid |" in text and "| max_steps | 24 |" in text
    assert "### Final evaluation metrics" in text and "| rewards/accuracies |" in text
    assert "preftune train config.yaml" in text and "preftune 0.1.0" in text


def test_hub_base_model():
    assert hub_base_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert hub_base_model("./models/x") is None
    card = ModelCard(card_text({"model": "Qwen/Qwen2.5-0.5B", "beta": 0.2, "loss": "sigmoid+sft"}, task="dpo",
                               adapter=True, data_info={"files": [{"path": "d.jsonl", "rows": 3, "sha256": "ab"}],
                                                        "fingerprint": "f00"},
                               command="preftune train c.yaml --beta 0.2", versions={"preftune": "9.9"}))
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B" and card.data.library_name == "peft"
    assert "lora" in card.data.tags and "loss sigmoid + sft, β = 0.2" in card.text
    assert "| d.jsonl | 3 | ab |" in card.text and "- fingerprint: f00" in card.text
    assert "preftune train c.yaml --beta 0.2" in card.text and "AutoPeftModelForCausalLM" in card.text


def test_callback_writes_the_card_at_train_end(tiny_dpo_run, tmp_path):
    final = tmp_path / "final"
    shutil.copytree(tiny_dpo_run / "final", final)
    state = SimpleNamespace(config=TrainConfig(model="org/base", data="x.jsonl", beta=0.3), task="dpo",
                            is_main_process=True, interrupted=False, final_dir=final,
                            train_metrics={"step": 5, "split": "train", "loss": 0.5}, eval_metrics={},
                            data_summary="loaded 3 pairs", data_info={"files": ["x.jsonl"], "rows": 3})
    ModelCardCallback().on_train_end(state)
    card = ModelCard.load(final / "README.md")
    assert card.data.base_model == "org/base"
    assert "| loss | 0.5 |" in card.text and "loaded 3 pairs" in card.text and "- rows: 3" in card.text
    (final / "README.md").unlink()
    state.interrupted, state.final_dir = True, None  # stopped before final/: no card (after it: final/ is whole)
    ModelCardCallback().on_train_end(state)
    assert not (final / "README.md").exists()
