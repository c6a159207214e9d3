"""The hostile and careless uses of issue 13, run through `preftune train` (the CLI), printed as a table: case,
exit status, the first line of stderr or the telling stdout line; then a check that a sibling folder (the target
of every planted link) is unchanged. Not a test (pytest does not collect it): a record of what the run folder
refuses, re-run by hand when that code changes; its last output is tests/HOSTILE_CASES.md.

    PYTHONPATH=$PWD:$PWD/tests .venv/bin/python tests/hostile_cases.py > /tmp/cases.md

Works in /tmp/rfcases (deleted first). The full-disk cases mount a 32 MiB tmpfs, so they need root; without it
they are skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from helpers import build_tiny_model, make_pairs, write_jsonl  # noqa: E402

from preftune import recipe  # noqa: E402
from preftune.callbacks import Callback  # noqa: E402
from preftune.cli import main  # noqa: E402

ROOT = Path("/tmp/rfcases")
if ROOT.exists():
    subprocess.run(["umount", str(ROOT / "disk")], capture_output=True)
    shutil.rmtree(ROOT)
ROOT.mkdir()
MODEL = build_tiny_model(ROOT / "model")
DATA = write_jsonl(ROOT / "pairs.jsonl", make_pairs(64, seed=1))
MINE = ROOT / "mine"  # the user's sibling folder: link targets point here
MINE.mkdir()
(MINE / "notes.txt").write_text("the user's notes\n")
(MINE / "folder").mkdir()
(MINE / "folder" / "data.bin").write_bytes(os.urandom(4096))
ROWS: list[tuple[str, str, str, str]] = []


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_symlink():
            h.update(os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def argv(out, *extra, model=MODEL, data=DATA):
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--max-steps", "2",
            "--batch-size", "4", "--max-length", "64", "--max-prompt-length", "32", "--progress", "false", *extra]


def run(cls: str, case: str, args: list[str], callbacks=(), look_for: str = "") -> int:
    out, err = io.StringIO(), io.StringIO()
    defaults = recipe.default_callbacks
    recipe.default_callbacks = lambda cfg: defaults(cfg) + list(callbacks)
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(args)
            except BaseException as e:  # a traceback: recorded as such
                code = f"traceback {type(e).__name__}"
    finally:
        recipe.default_callbacks = defaults
    seconds = time.perf_counter() - t0
    lines = err.getvalue().strip().splitlines()
    said = next((ln for ln in out.getvalue().splitlines() if look_for and look_for in ln), "")
    msg = " / ".join(x for x in (said, lines[-1] if lines else "") if x)
    ROWS.append((cls, case, str(code), msg.replace("|", "\\|").replace(str(ROOT), "…")))
    print(f"[{code}] {case} ({seconds:.1f}s): {msg[:160]}", file=sys.__stderr__)
    return code


def fresh_run(name, *extra) -> Path:
    out = ROOT / name
    assert main(argv(out, "--save-steps", "1", *extra)) == 0
    return out


def link(path: Path, target: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    path.symlink_to(target)


before = tree_hash(MINE)
with contextlib.redirect_stdout(io.StringIO()):
    base = fresh_run("base")

# --- data loss ---------------------------------------------------------------------------------------------------
for name, make in (("config.yaml", lambda p: p.write_text("mine")), ("final", lambda p: p.mkdir()),
                   ("checkpoints", lambda p: p.mkdir())):
    out = ROOT / f"foreign-{name}"
    out.mkdir()
    make(out / name)
    run("data loss", f"--overwrite on a folder with the user's own {name} (no mark)", argv(out, "--overwrite"))
out = ROOT / "marked-final"
shutil.copytree(base, out)
mark = json.loads((out / ".preftune-run.json").read_text())
mark["names"].remove("final")
(out / ".preftune-run.json").write_text(json.dumps(mark))
run("data loss", "--overwrite where final/ is not in preftune's mark", argv(out, "--overwrite"))
out = ROOT / "marked-ckpt"
shutil.copytree(base, out)
(out / "checkpoints" / "best-model").mkdir()
run("data loss", "--overwrite with the user's checkpoints/best-model", argv(out, "--overwrite"))
out = ROOT / "notes"
shutil.copytree(base, out)
(out / "notes.txt").write_text("keep")
run("data loss", "--overwrite on a preftune folder with the user's notes.txt (kept: "
    f"{'yes' if True else ''})", argv(out, "--overwrite"), look_for="done:")
ROWS[-1] = ROWS[-1][:3] + (ROWS[-1][3] + f" — notes.txt kept: {(out / 'notes.txt').read_text() == 'keep'}",)
out = ROOT / "unmarked"
(out / "checkpoints").mkdir(parents=True)
run("data loss", "--resume into a folder preftune did not make", argv(out, "--resume"))

# --- escaping ----------------------------------------------------------------------------------------------------
for name, flags, target in (("metrics.jsonl", ["--resume"], MINE / "notes.txt"),
                            ("config.yaml", ["--overwrite"], MINE / "notes.txt"),
                            (".tmp-final", ["--overwrite"], MINE / "folder"),
                            ("checkpoints", ["--overwrite"], MINE / "folder"),
                            ("reference_logps", ["--overwrite"], MINE / "folder"),
                            ("checkpoints/step-0000009", ["--resume"], MINE / "folder"),
                            (".preftune.lock", ["--resume"], MINE / "notes.txt")):
    out = ROOT / f"link-{name.replace('/', '-')}"
    shutil.copytree(base, out, symlinks=True)
    link(out / name, target)
    run("escaping", f"symlink planted at {name} ({' '.join(flags)})", argv(out, *flags, "--max-steps", "3"))


class Plant(Callback):
    def __init__(self, out):
        self.out = out

    def on_step_end(self, state):
        if not (self.out / ".tmp-final").is_symlink():
            (self.out / ".tmp-final").symlink_to(MINE / "folder")


out = ROOT / "plant-during"
run("escaping", "symlink .tmp-final planted during the run", argv(out), callbacks=[Plant(out)])

# --- silent wrong training ---------------------------------------------------------------------------------------
other_arch = ROOT / "gpt2-config"
shutil.copytree(MODEL, other_arch)
from transformers import GPT2Config  # noqa: E402

GPT2Config(vocab_size=json.loads((MODEL / "config.json").read_text())["vocab_size"], n_embd=32, n_layer=2,
           n_head=4).save_pretrained(other_arch)
run("silent wrong training", "config.json names GPT-2, weights are Llama", argv(ROOT / "o-arch", model=other_arch))
run("silent wrong training", "--eval-batch-size -1", argv(ROOT / "o-ebs", "--eval-batch-size", "-1"))
out = ROOT / "zeros"
shutil.copytree(base, out)
from safetensors.torch import save_file  # noqa: E402

cache = next((out / "reference_logps").glob("train-*.safetensors"))
save_file({"chosen": torch.zeros(64), "rejected": torch.zeros(64)}, str(cache))
run("silent wrong training", "all-zero reference cache under the normal key", argv(out, "--overwrite"),
    look_for="unusable")
loss1 = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
ROWS[-1] = ROWS[-1][:3] + (ROWS[-1][3] + f" — step-1 loss {loss1:.6f} (ln 2 = 0.693147)",)
other_data = write_jsonl(ROOT / "other.jsonl", make_pairs(64, seed=99))
other_model = build_tiny_model(ROOT / "other-model", seed=5)
for i, (case, extra, kw) in enumerate((("beta changed", ["--beta", "0.2"], {}), ("loss changed", ["--loss", "ipo"], {}),
                        ("batch size changed", ["--batch-size", "8"], {}), ("seed changed", ["--seed", "7"], {}),
                        ("other data", [], {"data": other_data}), ("other model", [], {"model": other_model}),
                        ("--resume-force with beta changed", ["--beta", "0.2", "--resume-force", "--max-steps", "3"], {}),
                        ("max_steps/save_steps changed (allowed)", ["--max-steps", "3", "--save-steps", "2"], {}))):
    out = ROOT / f"resume-{i}"
    shutil.copytree(base, out)
    run("silent wrong training", f"--resume, {case}", argv(out, "--resume", *extra, **kw), look_for="resum")

# two runs on one folder: a real second process
out = ROOT / "two-runs"
proc = subprocess.Popen([sys.executable, "-m", "preftune", *argv(out, "--max-steps", "500")],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
while not (out / "metrics.jsonl").is_file():
    time.sleep(0.1)
run("silent wrong training", "a second run on a folder in use (--overwrite)", argv(out, "--overwrite"))
run("silent wrong training", "a second run on a folder in use (--resume)", argv(out, "--resume"))
proc.send_signal(signal.SIGTERM)
_, stderr = proc.communicate(timeout=120)
ROWS.append(("exit status", "SIGTERM during training", str(proc.returncode), stderr.strip().splitlines()[-1]))
steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
ROWS.append(("exit status", "… its metrics.jsonl: one run's lines, contiguous", "",
             f"steps 1..{steps[-1]} contiguous: {steps == list(range(1, len(steps) + 1))}; lock left: "
             f"{(out / '.preftune.lock').exists()}"))
run("exit status", "… the same command with --resume auto (max-steps shortened)",
    argv(out, "--resume", "auto", "--max-steps", str(len(steps) + 2)), look_for="resumed")

# --- tracebacks → sentences ------------------------------------------------------------------------------------
out = ROOT / "trunc"
shutil.copytree(base, out)
p = next((out / "checkpoints" / "step-0000002" / "state").glob("*.distcp"))
p.write_bytes(p.read_bytes()[:100])
run("traceback → sentence", "--resume, newest checkpoint truncated", argv(out, "--resume", "--max-steps", "3"),
    look_for="newest intact")
out = ROOT / "all-damaged"
shutil.copytree(base, out)
for ck in (out / "checkpoints").iterdir():
    (ck / "scheduler.pt").write_bytes(b"x")
run("traceback → sentence", "--resume, every checkpoint damaged", argv(out, "--resume"))
run("traceback → sentence", "--resume PATH of a damaged checkpoint",
    argv(out, "--resume", str(out / "checkpoints" / "step-0000002")))
for case, extra in (("--output-dir 2024-06-01", None), ("--model 123", ["--model", "123"]),
                    ("--prompt-field 1", ["--prompt-field", "1"]), ("--adam-beta1 2", ["--adam-beta1", "2"]),
                    ("--weight-decay -1", ["--weight-decay", "-1"]), ("--seed -1", ["--seed", "-1"]),
                    ("--max-steps -1", ["--max-steps", "-1"]),
                    ("--attn-implementation flash_attention_2 (no flash-attn)",
                     ["--attn-implementation", "flash_attention_2"])):
    if extra is None:
        cwd = os.getcwd()
        os.chdir(ROOT)
        run("traceback → sentence", case, argv("2024-06-01"), look_for="done:")
        os.chdir(cwd)
        ROWS[-1] = ROWS[-1][:3] + (ROWS[-1][3] + f" — folder {(ROOT / '2024-06-01' / 'final').is_dir()}",)
    else:
        run("traceback → sentence", case, argv(ROOT / f"o-{case.split()[0]}", *extra))
small = ROOT / "small-vocab"
shutil.copytree(MODEL, small)
from transformers import AutoModelForCausalLM  # noqa: E402

m = AutoModelForCausalLM.from_pretrained(small)
m.resize_token_embeddings(100)
m.save_pretrained(small)
run("traceback → sentence", "model vocabulary (100) smaller than the tokenizer's ids", argv(ROOT / "o-vocab", model=small))
sur = ROOT / "surrogate.jsonl"
sur.write_bytes(b'{"prompt": "a \\ud800 b", "chosen": " yes", "rejected": " no"}\n' + DATA.read_bytes())
run("traceback → sentence", "lone UTF-16 surrogate in a JSON string",
    argv(ROOT / "o-sur", data=sur))
bomb = ROOT / "bomb.yaml"
lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
bomb.write_text("\n".join(lines) + "\nloss: *l8\n")
run("traceback → sentence", "YAML alias bomb (9^9 values)", ["train", str(bomb)])
(ROOT / "afile").write_text("x")
run("traceback → sentence", "uncreatable output folder (a parent is a file)", argv(ROOT / "afile" / "run"))

# --- a real full disk (tmpfs) --------------------------------------------------------------------------------------
disk = ROOT / "disk"
disk.mkdir()
if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)]).returncode == 0:
    from outputs.test_disk_full import Disk, FillAt  # the full-disk tests' own filler and trigger

    tmpfs = Disk(disk, "tmpfs", None)

    def leftovers(out):
        return [str(p.relative_to(out)) for p in out.rglob(".tmp-*")]

    for k, (case, cb, extra) in enumerate((("checkpoint of step 2", FillAt(tmpfs, "log", 2), ["--save-steps", "1"]),
                                           ("final/ (save-steps 1)", FillAt(tmpfs, "save", 2), ["--save-steps", "1"]),
                                           ("final/ (save-steps 0)", FillAt(tmpfs, "log", 2), []),
                                           ("metrics.jsonl (first line)", FillAt(tmpfs, "step", 1), []))):
        out = disk / f"site{k}"
        run("full disk (tmpfs, real ENOSPC)", f"disk fills at the {case}", argv(out, *extra), callbacks=[cb])
        ROWS[-1] = ROWS[-1][:3] + (ROWS[-1][3] + f" — .tmp-* left: {leftovers(out)}",)
        tmpfs.free()
        if case.startswith(("checkpoint", "final/ (save-steps 1)")):
            run("full disk (tmpfs, real ENOSPC)", "… after freeing space: the same command with --resume",
                argv(out, *extra, "--resume"), look_for="done:")
    import preftune.modeling.reference as reference

    real_save = reference.save_file

    def fill_then_save(*a, **k):
        tmpfs.fill()
        return real_save(*a, **k)

    reference.save_file = fill_then_save
    run("full disk (tmpfs, real ENOSPC)", "disk fills at the reference cache", argv(disk / "ref"))
    ROWS[-1] = ROWS[-1][:3] + (ROWS[-1][3] + f" — .tmp-* left: {leftovers(disk / 'ref')}",)
    reference.save_file = real_save
    tmpfs.free()
    from preftune.outputs import run_dir

    real_create = run_dir.RunDir.create

    def create_then_fill(self, **kw):
        real_create(self, **kw)
        tmpfs.fill()

    run_dir.RunDir.create = create_then_fill
    run("full disk (tmpfs, real ENOSPC)", "disk fills at config.yaml", argv(disk / "cfg"))
    ROWS[-1] = ROWS[-1][:3] + (ROWS[-1][3] + f" — .tmp-* left: {leftovers(disk / 'cfg')}",)
    run_dir.RunDir.create = real_create
    subprocess.run(["umount", str(disk)])

after = tree_hash(MINE)
print("| class | case | exit | message (first line of stderr; / the telling stdout line) |")
print("|---|---|---|---|")
for r in ROWS:
    print("| " + " | ".join(r) + " |")
print(f"\nsibling folder {MINE}: sha256 of names+contents before {before[:16]}, after {after[:16]}: "
      f"{'unchanged' if before == after else 'CHANGED'}")
