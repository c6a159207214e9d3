"""What the demo may delete in its output folder: only what an earlier demo's manifest lists (issue 13:
`--overwrite` used to delete a user's own data/ and base/). Each refusal leaves the folder byte-identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from examples.news_demo.pipeline import DEMO_FILES, MANIFEST, prepare_output_dir
from preftune.errors import PreftuneError

RUN = DEMO_FILES[:4]        # a run from the committed base: demo.json, summaries.jsonl, data, dpo
SCRATCH = DEMO_FILES        # a --from-scratch run also writes base/ and base_work/


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with its content, or where its link points (links are not followed)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = ("link:" + str(p.readlink()) if p.is_symlink() else "dir" if p.is_dir()
                    else "file:" + p.read_text())
    return out


def earlier_demo(out: Path, names=RUN) -> None:
    """A folder as a finished demo run leaves it: its files and a manifest listing them."""
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name.endswith((".json", ".jsonl")):
            (out / name).write_text("old run")
        else:
            (out / name).mkdir()
            (out / name / "f.txt").write_text("old run")
    (out / MANIFEST).write_text(json.dumps({"entries": sorted(names)}))


def assert_refused(root: Path, out: Path, names: tuple[str, ...], overwrite: bool, match: str) -> None:
    """prepare_output_dir refuses with a sentence matching `match`, and nothing under `root` changed."""
    before = snapshot(root)
    with pytest.raises(PreftuneError, match=match):
        prepare_output_dir(out, names, overwrite=overwrite)
    assert snapshot(root) == before


def test_fresh_folder_gets_a_manifest_of_what_the_run_writes(tmp_path):
    out = prepare_output_dir(tmp_path / "new" / "demo", SCRATCH, overwrite=False)
    assert json.loads((out / MANIFEST).read_text())["entries"] == sorted(SCRATCH)
    assert [p.name for p in out.iterdir()] == [MANIFEST]


@pytest.mark.parametrize("overwrite", [False, True])
def test_users_own_data_and_base_are_never_deleted(tmp_path, overwrite):
    """The issue 13 case: a folder with the user's data/ and base/ and no manifest."""
    out = tmp_path / "mine"
    for name in ("data", "base"):
        (out / name).mkdir(parents=True)
        (out / name / "precious.txt").write_text(name)
    assert_refused(tmp_path, out, SCRATCH, overwrite, r"holds data, base, which no demo manifest .* choose another")


def test_overwrite_replaces_only_the_listed_names(tmp_path):
    out = tmp_path / "demo"
    earlier_demo(out)
    (out / "notes.txt").write_text("the user's")
    (out / "base").mkdir()  # the user's, not listed: a run from the committed base does not write base/
    prepare_output_dir(out, RUN, overwrite=True)
    assert snapshot(out) == {"base": "dir", "notes.txt": "file:the user's",
                             MANIFEST: "file:" + json.dumps({"written_by": "examples/news_demo",
                                                            "entries": sorted(RUN)}, indent=2) + "\n"}


def test_a_from_scratch_run_refuses_an_unlisted_base_before_deleting_anything(tmp_path):
    out = tmp_path / "demo"
    earlier_demo(out)
    (out / "base").mkdir()
    assert_refused(tmp_path, out, SCRATCH, True, "holds base, which no demo manifest")


def test_an_earlier_run_needs_overwrite(tmp_path):
    out = tmp_path / "demo"
    earlier_demo(out, SCRATCH)
    assert_refused(tmp_path, out, RUN, False, "already holds a demo run; pass --overwrite")
    # With it, every name the earlier run listed goes, base/ and base_work/ included.
    prepare_output_dir(out, RUN, overwrite=True)
    assert [p.name for p in out.iterdir()] == [MANIFEST]


def test_a_listed_name_that_became_a_link_is_unlinked_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("outside the run folder")
    out = tmp_path / "demo"
    earlier_demo(out, ("demo.json",))
    (out / "demo.json").unlink()
    (out / "data").symlink_to(outside, target_is_directory=True)
    (out / MANIFEST).write_text(json.dumps({"entries": ["data", "demo.json"]}))
    prepare_output_dir(out, RUN, overwrite=True)
    assert not (out / "data").exists() and (outside / "keep.txt").read_text() == "outside the run folder"


@pytest.mark.parametrize("manifest, reason", [
    (json.dumps({"entries": ["../victim"]}), "names the demo never writes"),
    (json.dumps({"entries": "data"}), "names the demo never writes"),
    (json.dumps({"files": ["data"]}), "entries"),
    ("{not json", "Expecting property name"),
    (json.dumps(["data"]), "list indices"),
])
def test_a_manifest_that_cannot_be_trusted_deletes_nothing(tmp_path, manifest, reason):
    (tmp_path / "victim").write_text("outside")
    out = tmp_path / "demo"
    earlier_demo(out)
    (out / MANIFEST).write_text(manifest)
    assert_refused(tmp_path, out, RUN, True, f"demo manifest .* cannot be trusted .*{reason}")


def test_a_manifest_link_and_a_file_as_output_dir_are_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"entries": list(RUN)}))
    out = tmp_path / "demo"
    earlier_demo(out)
    (out / MANIFEST).unlink()
    (out / MANIFEST).symlink_to(elsewhere)
    before = snapshot(tmp_path)
    with pytest.raises(PreftuneError, match="symlink"):
        prepare_output_dir(out, RUN, overwrite=True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(PreftuneError, match="is a file"):
        prepare_output_dir(tmp_path / "afile", RUN, overwrite=True)
    assert snapshot(tmp_path) == {**before, "afile": "file:x"}
