"""The demo's command line (`python -m examples.news_demo`) and the library's thin `preftune demo` verb."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import examples.news_demo.onpolicy as onpolicy
import examples.news_demo.pipeline as pipeline
from examples.news_demo import cli as demo_cli
from preftune import cli

ROOT = Path(__file__).resolve().parents[3]

ALL_FLAGS = ["--output-dir", "d", "--from-scratch", "--eval-articles", "7", "--judge", "m:f", "--seed", "3",
             "--quick", "--overwrite"]
EXPECTED = dict(output_dir="d", from_scratch=True, n_eval=7, judge="m:f", seed=3, quick=True, overwrite=True)


@pytest.fixture
def calls(monkeypatch):
    """run_demo replaced by a recorder: these tests are about the flags, not the run."""
    seen: list[dict] = []
    monkeypatch.setattr(pipeline, "run_demo", lambda **kw: seen.append(kw))
    return seen


@pytest.mark.parametrize("main", [demo_cli.main, lambda argv: cli.main(["demo", *argv])],
                         ids=["python -m examples.news_demo", "preftune demo"])
def test_every_flag_reaches_run_demo(main, calls):
    assert main(ALL_FLAGS) == 0
    assert main([]) == 0
    assert calls == [EXPECTED, dict(output_dir="runs/demo", from_scratch=False, n_eval=200, judge=None, seed=0,
                                    quick=False, overwrite=False)]


@pytest.mark.parametrize("main", [demo_cli.main, lambda argv: cli.main(["demo", *argv])],
                         ids=["python -m examples.news_demo", "preftune demo"])
def test_on_policy_runs_the_second_story_with_its_own_default_folder(main, calls, monkeypatch):
    seen: list[dict] = []
    monkeypatch.setattr(onpolicy, "run_onpolicy_demo", lambda **kw: seen.append(kw))
    assert main(["--on-policy", "--pairs-judge", "m:score", "--quick"]) == 0
    assert main(["--on-policy", *ALL_FLAGS]) == 0
    assert seen == [dict(output_dir="runs/demo-onpolicy", pairs_judge="m:score", from_scratch=False, n_eval=200,
                         judge=None, seed=0, quick=True, overwrite=False), dict(EXPECTED, pairs_judge=None)]
    assert calls == []


def test_bad_flags_are_one_sentence_and_exit_2(capsys, calls):
    assert demo_cli.main(["--eval-articles", "many"]) == 2
    assert cli.main(["demo", "--bogus"]) == 2
    assert demo_cli.main(["--pairs-judge", "m:score"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("python -m examples.news_demo: error: argument --eval-articles: invalid int")
    assert err[1] == ("preftune demo: error: unrecognized arguments: --bogus (see `preftune demo --help`)")
    assert err[2] == ("python -m examples.news_demo: error: --pairs-judge scores the sampled summaries of the "
                      "on-policy story; pass it with --on-policy.")
    assert len(err) == 3 and calls == []


def test_a_run_error_is_one_sentence_through_either_entry(capsys, tmp_path):
    assert cli.main(["demo", "--output-dir", str(tmp_path / "x"), "--eval-articles", "0"]) == 2
    assert capsys.readouterr().err == "preftune demo: error: n_eval must be at least 1 held-out article, got 0.\n"
    assert not (tmp_path / "x").exists()


def test_preftune_demo_help_is_the_examples_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: preftune demo") and "--from-scratch" in out and "--overwrite" in out
    assert "--on-policy" in out and "--pairs-judge" in out


def test_library_cli_keeps_no_demo_flags():
    demo_parser = cli.build_parser()._subparsers._group_actions[0].choices["demo"]
    assert [a.dest for a in demo_parser._actions] == []


def test_preftune_demo_outside_a_clone_says_to_use_make_demo(tmp_path):
    """An installed package (here: a copy of preftune/ with no examples/ beside it) run from a folder that
    is no clone: one sentence, exit 2, nothing written."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "preftune", site / "preftune", ignore=shutil.ignore_patterns("__pycache__"))
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-m", "preftune", "demo", "--quick"], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr == ("preftune: error: the demo is not part of the installed package; run `make demo` "
                        "(or `preftune demo`) in a clone of the preftune repository.\n")
    assert list(cwd.iterdir()) == []


def test_python_m_examples_news_demo_runs_from_the_repository_root(tmp_path):
    """The entry point `make demo` uses, as a fresh process from the root (here stopped at a bad flag)."""
    r = subprocess.run([sys.executable, "-m", "examples.news_demo", "--output-dir", str(tmp_path / "d"),
                        "--eval-articles", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stderr) == (2, "python -m examples.news_demo: error: n_eval must be at least 1 "
                                           "held-out article, got 0.\n")
