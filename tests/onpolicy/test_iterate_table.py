"""The table of rounds as iterate prints it: numbers to the table's precision, a sampled KL a hair below 0 shown as
0 (not "-0.000"), a real negative value kept, missing values as "-"."""

from __future__ import annotations

from preftune.onpolicy.iterate_table import COLUMNS, cells, round_line


def _row(**values) -> dict:
    return {"round": 1, "pairs": 1234, "status": "kept", **values}


def test_cells_round_to_the_table_precision_and_never_show_minus_zero():
    row = _row(kl_first=-2.8e-6, kl_start=0.0641, score_mean=-0.25, good_share=0.975)
    shown = dict(zip(COLUMNS, cells(row)))
    assert shown["round"] == "1" and shown["pairs"] == "1,234" and shown["status"] == "kept"
    assert shown["KL→first"] == "0.000"  # -2.8e-6 at 3 decimals
    assert shown["KL→start"] == "0.064" and shown["score"] == "-0.250" and shown["good"] == "97.5%"
    assert [c for c, v in shown.items() if v == "-"] == ["gap median", "steps", "loss", "log p chosen",
                                                       "log p rejected", "win vs first [95%]",
                                                       "win vs previous [95%]"]
    assert "to first 0.000, to start 0.064 nats/token" in round_line(row)
