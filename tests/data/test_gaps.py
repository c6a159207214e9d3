"""`preftune inspect` on files of on-policy pairs (`preftune pairs` writes score_chosen, score_rejected, gap and
source beside prompt/chosen/rejected): the gap histogram, the share of pairs whose chosen answer is longer and the
pairs with the smallest gaps, in the report, the terminal text and the HTML page."""

from __future__ import annotations

import json

from preftune import cli
from preftune.audit import audit, write_audit
from preftune.outputs.audit_page import format_audit


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# (gap, chosen, rejected): words 3 vs 2 (longer), 1 vs 2 (shorter), 2 vs 2 (equal), 4 vs 1 (longer),
# 2 vs 3 (shorter), 2 vs 1 (longer).
HAND = [(1, "a b c", "d e"), (3, "x", "y z"), (3, "p q", "r s"), (5, "one two three four", "no"),
        (2, "m n", "o p q"), (1, "u v", "w")]


def hand_file(tmp_path):
    return write_rows(tmp_path / "pairs.jsonl", [
        {"prompt": f"question {i}", "chosen": c, "rejected": r, "score_chosen": 6, "score_rejected": 6 - g,
         "gap": g, "source": {"judge": "judge.py:score", "model": "sft"}}
        for i, (g, c, r) in enumerate(HAND, 1)])


def test_gap_histogram_longer_share_and_smallest_gaps_worked_out_by_hand(tmp_path):
    """Gaps 1, 3, 3, 5, 2, 1 are integers spanning 4 (< 20 bins): one bin per value 1..5, counts [2, 1, 2, 0, 1]
    over edges 0.5..5.5. Chosen is longer in rows 1, 4 and 6: 3 of 6 pairs (0.5); 5 pairs differ in length
    (row 3 is 2 vs 2), so 3/5 = 0.6 among them. Smallest gaps in order: rows 1 and 6 (gap 1, file order), 5 (2),
    2 and 3 (3), 4 (5)."""
    path = hand_file(tmp_path)
    g = audit(str(path))["gaps"]
    assert g["pairs"] == 6 and g["without_score"] == 0 and g["not_positive"] == 0
    assert g["histogram"] == {"edges": [0.5, 1.5, 2.5, 3.5, 4.5, 5.5], "counts": [2, 1, 2, 0, 1]}
    assert (g["gap"]["min"], g["gap"]["median"], g["gap"]["max"], g["gap"]["mean"]) == (1, 2.5, 5, 2.5)
    assert g["length_unit"] == "words"
    assert (g["chosen_longer"], g["pairs_with_unequal_lengths"], g["chosen_longer_among_unequal"]) == (0.5, 5, 0.6)
    assert [s["where"].rsplit(" ", 1)[1] for s in g["smallest"]] == ["1", "6", "5", "2", "3", "4"]
    assert g["smallest"][0] == {"where": f"{path} line 1", "gap": 1, "score_chosen": 6.0, "score_rejected": 5.0,
                                "prompt": "question 1", "chosen": "a b c", "rejected": "d e"}
    assert g["judges"] == {"judge.py:score": 6}


def test_terminal_text_and_html_page_show_the_gaps(tmp_path, capsys):
    path = hand_file(tmp_path)
    assert cli.main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "judge's scores (gap = score chosen - score rejected; judge judge.py:score): 6 scored pairs" in text
    # one bar per gap value, the longest (2 pairs) 40 characters wide
    assert "    1 | " + "#" * 40 + " 2\n" in text and "    4 |  0\n" in text and "    5 | " + "#" * 20 + " 1" in text
    assert "chosen is the longer answer (words) in 50.0% of pairs, 60.0% of the 5 whose lengths differ" in text
    assert f"      1  {path} line 1: chosen 'a b c' | rejected 'd e'" in text
    write_audit(audit(str(path)), tmp_path / "report.json", tmp_path / "report.html")
    assert json.loads((tmp_path / "report.json").read_text())["gaps"]["histogram"]["counts"] == [2, 1, 2, 0, 1]
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Judge's scores (6 scored pairs)</h2>" in page and "judge&#x27;s gap" in page  # section, figure
    assert page.count("<div class='where'>line ") == 6  # the smallest gaps: all six here


def test_sampled_token_counts_and_scores_without_a_gap_field(tmp_path):
    """Every row records its answers' sampled tokens, so lengths are those, not words: chosen 5 > 3 and 2 < 9
    (1 of 2 longer). The second row has no `gap`: 4.5 − 1.25 = 3.25. Gaps 0.5 and 3.25 are not integers: 20
    bins of (3.25 − 0.5) / 20 = 0.1375, the first and the last holding one each."""
    path = write_rows(tmp_path / "p.jsonl", [
        {"prompt": "q1", "chosen": "one", "rejected": "one two three four", "gap": 0.5,
         "source": {"chosen_tokens": 5, "rejected_tokens": 3}},
        {"prompt": "q2", "chosen": "a b c d e f", "rejected": "b", "score_chosen": 4.5, "score_rejected": 1.25,
         "source": {"chosen_tokens": 2, "rejected_tokens": 9}}])
    g = audit(str(path))["gaps"]
    assert g["length_unit"] == "tokens as sampled" and g["chosen_longer"] == 0.5
    assert g["gap"]["max"] == 3.25 and g["judges"] == {}
    assert len(g["histogram"]["counts"]) == 20 and g["histogram"]["counts"][0] == g["histogram"]["counts"][-1] == 1
    assert sum(g["histogram"]["counts"]) == 2 and g["histogram"]["edges"][1] == 0.6375


def test_smallest_gaps_show_the_answers_from_where_they_differ(tmp_path):
    """Answers sharing 20 words (100 characters) are shown from 15 characters before the first difference (at
    character 100), so that the difference is on screen."""
    shared = "same " * 20
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": shared + "ends here.",
                                              "rejected": shared + "goes on and on.", "gap": 1}])
    item = audit(str(path))["gaps"]["smallest"][0]
    assert (item["chosen"], item["rejected"]) == ("...same same same ends here.", "...same same same goes on and on.")


def test_swapped_and_mixed_files_are_warned_about_and_plain_data_has_no_section(tmp_path):
    mixed = write_rows(tmp_path / "mixed.jsonl", [
        {"prompt": "q1", "chosen": "a", "rejected": "b", "gap": -2},
        {"prompt": "q2", "chosen": "a", "rejected": "b", "score_chosen": 1, "score_rejected": 1},
        {"prompt": "q3", "chosen": "a", "rejected": "b", "gap": "3"},  # not a number: no score
        {"prompt": "q4", "chosen": "a", "rejected": "b"}])
    report = audit(str(mixed))
    assert (report["gaps"]["pairs"], report["gaps"]["not_positive"], report["gaps"]["without_score"]) == (2, 2, 2)
    assert "2 pairs have a gap <= 0 (the chosen answer was not scored above the rejected one)" in " ".join(report["warnings"])
    assert "2 pairs carry no judge's score beside the 2 that do" in " ".join(report["warnings"])
    plain = write_rows(tmp_path / "plain.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    report = audit(str(plain))
    assert report["gaps"] is None and "judge's scores" not in format_audit(report)
