"""Hostile and careless uses of preftune, run through the CLI (and the Python API where the case is about it),
printed as a table: class, case, exit status, the first line of stderr or the telling stdout line, and for the
rows of issue 26 whether the guarantee holds (no weights lost, nothing written outside the run folder or through a
link, no stale reuse, no traceback, no hang or unbounded memory: each bounded case runs in its own process, under
1 GB RSS and 30 s); then a check that a sibling folder (the target of every planted link) is unchanged. Not a
test (pytest does not collect it): a record, re-run by hand when that code changes; its last output is
tests/HOSTILE_CASES.md.

    PYTHONPATH=$PWD:$PWD/tests .venv/bin/python tools/hostile_cases.py > /tmp/cases.md
    PYTHONPATH=$PWD:$PWD/tests .venv/bin/python tools/hostile_cases.py --only onpolicy   # pairs' and iterate's rows

Works in /tmp/rfcases (deleted first; $RFCASES to use another folder). The full-disk cases mount a 32 MiB tmpfs, so they need root; without it
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
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
_ROOT = os.environ.get("RFCASES", "/tmp/rfcases")  # (RFCASES: another folder, to run two trees side by side)
os.environ["HF_HUB_CACHE"] = f"{_ROOT}/hub"  # a hub cache of our own (the hub-revision case), read at import
os.environ["TMPDIR"] = f"{_ROOT}/tmp"  # where a fresh run stages its tokenized data: watched for leftovers

import torch  # noqa: E402

torch.set_num_threads(1)

from helpers import build_tiny_model, make_pairs, write_jsonl  # noqa: E402

from preftune import recipe  # noqa: E402
from preftune.callbacks import Callback  # noqa: E402
from preftune.cli import main  # noqa: E402
from preftune.errors import PreftuneError  # noqa: E402

ROOT = Path(_ROOT)
if ROOT.exists():
    subprocess.run(["umount", str(ROOT / "disk")], capture_output=True)
    shutil.rmtree(ROOT)
ROOT.mkdir()
(ROOT / "tmp").mkdir()
tempfile.tempdir = str(ROOT / "tmp")  # (TMPDIR is read once, and the folder did not exist yet)
MODEL = build_tiny_model(ROOT / "model")
DATA = write_jsonl(ROOT / "pairs.jsonl", make_pairs(64, seed=1))
MINE = ROOT / "mine"  # the user's sibling folder: link targets point here
MINE.mkdir()
(MINE / "notes.txt").write_text("the user's notes\n")
(MINE / "folder").mkdir()
(MINE / "folder" / "data.bin").write_bytes(os.urandom(4096))
ROWS: list[tuple[str, ...]] = []


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


HELD: list[bool] = []


def holds(ok: bool, note: str = "") -> None:
    """Issue 26's verdict on the last row: the guarantee holds (ok) or not; `note` is added to its message."""
    row = ROWS[-1]
    ROWS[-1] = (*row[:3], row[3] + (f" — {note}".replace(str(ROOT), "…") if note else ""), "yes" if ok else "**NO**")
    HELD.append(bool(ok))


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


def print_table(before: str) -> None:
    after = tree_hash(MINE)
    print("| class | case | exit | message (first line of stderr; / the telling stdout line) | holds |")
    print("|---|---|---|---|---|")
    for r in ROWS:
        print("| " + " | ".join((*r, "")[:5]) + " |")
    print(f"\nsibling folder {MINE}: sha256 of names+contents before {before[:16]}, after {after[:16]}: "
          f"{'unchanged' if before == after else 'CHANGED'}")
    print(f"issue 26 rows: {sum(HELD)} of {len(HELD)} hold")


def onpolicy_writes() -> None:
    """Issue 26: `preftune pairs` and `preftune iterate` write like a run folder. A link planted at a name they
    write (pairs' OUT.jsonl, its summary, its state folder, the verdict cache; iterate's rounds.json, a round
    folder, report/) is refused in one sentence, and the link's target in the user's folder is untouched."""
    import http.server
    import threading

    prompts = ROOT / "prompts.txt"
    prompts.write_text("".join(f"{p['prompt']}\n" for p in make_pairs(12, seed=7)))
    (ROOT / "score.py").write_text("def score(prompt, answer):\n    words = answer.split()\n"
                                   "    return float(len(set(words))) - 0.1 * len(words)\n")
    judge = ["--judge", f"{ROOT / 'score.py'}:score"]

    def pairs(out, *extra, with_judge=judge):
        return ["pairs", "--model", str(MODEL), "--prompts", str(prompts), *with_judge, "--output", str(out),
                "--samples", "3", "--max-new-tokens", "3", "--batch-size", "6", "--progress", "false",
                "--device", "cpu", *extra]

    def untouched(note: str = "") -> None:
        ok = ROWS[-1][2] == "2" and "symbolic link" in ROWS[-1][3] and tree_hash(MINE) == start
        holds(ok, f"{note}{'; ' if note else ''}user's folder unchanged: {tree_hash(MINE) == start}")

    start = tree_hash(MINE)
    run("writes (26)", "pairs --output OUT.jsonl, a dangling link to the user's folder", pairs(_planted(
        ROOT / "pl-out" / "pairs.jsonl", MINE / "new-pairs.jsonl")))
    untouched(f"link target created: {(MINE / 'new-pairs.jsonl').exists()}")
    (MINE / "new-pairs.jsonl").unlink(missing_ok=True)
    start = tree_hash(MINE)
    run("writes (26)", "pairs with OUT.state/ a link to the user's folder", pairs(_planted(
        ROOT / "pl-state" / "pairs.state", MINE / "folder").with_name("pairs.jsonl")))
    untouched()
    done = ROOT / "pl-done" / "pairs.jsonl"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(pairs(done)) == 0
    _planted(done.with_name("pairs.summary.json"), MINE / "notes.txt")
    start = tree_hash(MINE)
    run("writes (26)", "pairs rerun with a link at OUT.summary.json", pairs(done))
    untouched(f"the link still there: {done.with_name('pairs.summary.json').is_symlink()}")

    class Endpoint(http.server.BaseHTTPRequestHandler):
        """An OpenAI-compatible judge: the score is the answer's count of distinct words; HTTP 404 once `fail`
        requests were answered (a server going away)."""
        served, fail = 0, None

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            Endpoint.served += 1
            if Endpoint.fail is not None and Endpoint.served > Endpoint.fail:
                self.send_response(404)
                self.end_headers()
                return
            answer = body["messages"][0]["content"].rsplit("Answer:\n", 1)[-1]
            reply = json.dumps({"choices": [{"message": {"content": str(len(set(answer.split())))}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = ["--judge-url", f"http://127.0.0.1:{server.server_address[1]}/v1", "--judge-model", "m",
           "--judge-concurrency", "1", "--judge-retries", "0"]
    cut = ROOT / "pl-cache" / "pairs.jsonl"
    Endpoint.fail = 8  # the first run stops at the 9th verdict: 8 are in the cache
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main(pairs(cut, with_judge=url))
    Endpoint.fail = None
    _planted(cut.with_name("pairs.state") / "judge-cache-0.jsonl", MINE / "notes.txt")
    start = tree_hash(MINE)
    run("writes (26)", "pairs rerun (endpoint judge) with a link at the verdict cache OUT.state/judge-cache-0.jsonl",
        pairs(cut, with_judge=url))
    untouched()
    server.shutdown()

    def iterate(out, *extra):
        return ["iterate", "--model", str(MODEL), "--prompts", str(prompts), *judge, "--output-dir", str(out),
                "--rounds", "1", "--max-new-tokens", "4", "--max-steps", "2", "--batch-size", "4", "--max-length",
                "64", "--max-prompt-length", "32", "--eval-fraction", "0.25", "--sample-batch-size", "8",
                "--progress", "false", "--device", "cpu", *extra]

    with contextlib.redirect_stdout(io.StringIO()):
        assert main(iterate(ROOT / "it-base")) == 0
    for name, target, case in (("rounds.json", MINE / "notes.txt", "iterate --resume --rounds 2 with a link at rounds.json"),
                               ("round-2", MINE / "folder", "iterate --resume --rounds 2 with round-2/ a link to the "
                                                            "user's folder"),
                               ("report", MINE / "folder", "iterate --resume --rounds 2 with report/ a link to the "
                                                           "user's folder")):
        out = ROOT / f"it-{name}"
        shutil.copytree(ROOT / "it-base", out, symlinks=True)
        _planted(out / name, target)
        start = tree_hash(MINE)
        run("writes (26)", case, iterate(out, "--resume", "true", "--rounds", "2"))
        untouched()


def _planted(path: Path, target: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    link(path, target)
    return path


if "--only" in sys.argv:  # one class of rows alone (after a change to the code it is about)
    assert sys.argv[sys.argv.index("--only") + 1] == "onpolicy", "--only takes: onpolicy"
    before = tree_hash(MINE)
    onpolicy_writes()
    print_table(before)
    raise SystemExit(0)

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
    import preftune.modeling.precomputed as reference  # the reference cache is written there

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
    tmpfs.fill()  # issue 26: the disk is full before the tokenized data is written (a shared cache on it)
    run("traceback → sentence (26)", "disk full while building the data cache (--data-cache-dir on it)",
        argv(ROOT / "o-cachefull", "--data-cache-dir", str(disk / "shared")))
    holds(ROWS[-1][2] == "2" and "disk filled" in ROWS[-1][3] and not [
        p for p in (disk / "shared").glob(".tmp-*")], f"staging left: {[p.name for p in (disk / 'shared').glob('*')]}")
    tmpfs.free()
    subprocess.run(["umount", str(disk)])

# ================================================================================================================
# Issue 26: the commands after training, the caches and the limits, under the same guarantees as `train`.
# Each row says whether the guarantee holds ("holds"); the bounded cases run in their own process (peak RSS and
# seconds measured by wait4, killed past LIMIT_S).
# ================================================================================================================
import importlib  # noqa: E402
import re  # noqa: E402
import threading  # noqa: E402

LIMIT_S = 60
TEMP = Path(tempfile.gettempdir())  # = ROOT/tmp: where fresh runs stage their tokenized data


PEAK = """
import atexit, os, sys
def _peak():
    with open("/proc/self/status") as f:
        kb = next(ln for ln in f if ln.startswith("VmHWM")).split()[1]
    with open(os.environ["RFCASES_HWM"], "w") as f:
        f.write(kb)
atexit.register(_peak)
"""


def proc(cls: str, case: str, args: list[str], *, python: str | None = None, cwd: Path | None = None,
         env: dict | None = None) -> tuple[int, str, str, float, float]:
    """A case in a fresh process (`python -c python args...`, else `preftune args...`): (exit status, stdout,
    stderr, peak RSS in MiB, seconds); its row is added, with its RSS and seconds."""
    # The peak RSS is the process's own VmHWM, written at exit (wait4's ru_maxrss would count the pages of this
    # big process that the child shared until its exec).
    hwm = ROOT / "hwm"
    hwm.unlink(missing_ok=True)
    code = PEAK + (python or "import runpy; sys.argv[0] = 'preftune'; runpy.run_module('preftune', run_name='__main__')")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        # (run outside the checkout: `-c` and `-m` put the working directory first on sys.path)
        p = subprocess.Popen([sys.executable, "-c", code, *args], stdout=out, stderr=err, cwd=cwd or ROOT,
                             env={**os.environ, **(env or {}), "RFCASES_HWM": str(hwm)})
        timer = threading.Timer(LIMIT_S, p.kill)
        timer.start()
        p.wait()
        timer.cancel()
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    rss = int(hwm.read_text()) / 1024 if hwm.is_file() else float("nan")
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    msg = (lines[-1] if lines else "")[:400]
    ROWS.append((cls, case, str(p.returncode), f"{msg} [{rss:.0f} MiB, {seconds:.1f} s]".replace("|", "\\\\|")
                 .replace(str(ROOT), "…")))
    print(f"[{p.returncode}] {case} ({seconds:.1f}s, {rss:.0f} MiB): {msg[:160]}", file=sys.__stderr__)
    return p.returncode, stdout, stderr, rss, seconds


def bounded(rss: float, seconds: float) -> bool:
    return rss < 1024 and seconds < 30


def api(cls: str, case: str, call) -> None:
    """A Python API call that must raise PreftuneError (one sentence) and write nothing."""
    try:
        call()
        code, msg = "returned", ""
    except PreftuneError as e:
        code, msg = "PreftuneError", str(e)
    except BaseException as e:  # noqa: BLE001 - a traceback, recorded as such
        code, msg = f"traceback {type(e).__name__}", str(e)[:200]
    ROWS.append((cls, case, code, msg.replace("|", "\\\\|").replace(str(ROOT), "…")))
    holds(code == "PreftuneError" and "\n" not in msg)


def run_tree(out: Path) -> str:
    """A hash of a run folder's names and contents, its lock and report aside."""
    h = hashlib.sha256()
    for p in sorted(out.rglob("*")):
        if p.name == ".preftune.lock" or "report" in p.parts:
            continue
        h.update(str(p.relative_to(out)).encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


def stagings() -> list[str]:
    return sorted(p.name for p in TEMP.glob("preftune-data-*"))


def last_lines(out: Path, split: str = "train") -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if f'"{split}"' in x]


EVAL = write_jsonl(ROOT / "eval.jsonl", make_pairs(16, seed=3))
with contextlib.redirect_stdout(io.StringIO()):
    assert main(argv(ROOT / "finished")) == 0  # a finished run: final/, no checkpoint
FINISHED = ROOT / "finished"

# --- weights lost: a signal in every phase ---------------------------------------------------------------------
SIGNAL_AT = """
import os, signal, sys
import preftune.recipe as recipe
import preftune.data.splits as splits
where, sig = sys.argv[1], getattr(signal, sys.argv[2])
def hit(real):
    def wrapped(*a, **k):
        os.kill(os.getpid(), sig) if where != "setup-kill" else None
        out = real(*a, **k)
        if where == "setup-kill":
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return wrapped
if where == "eval":
    real_eval = recipe.Recipe.evaluate
    def evaluate(self, *a, **k):
        if self.state.step == self.state.total_steps:
            os.kill(os.getpid(), sig)
        return real_eval(self, *a, **k)
    recipe.Recipe.evaluate = evaluate
elif where == "save":
    recipe.save_final = hit(recipe.save_final)
else:
    splits.build_entry = hit(splits.build_entry)
from preftune.cli import main
raise SystemExit(main(sys.argv[3:]))
"""
out = ROOT / "sig-eval"
code, *_ = proc("weights kept (26)", "SIGTERM during the final evaluation (--save-steps 0)",
                ["eval", "SIGTERM", *argv(out, "--eval-data", str(EVAL))], python=SIGNAL_AT)
holds(code == 75 and (out / "final" / "model.safetensors").is_file(),
      f"final/ whole: {(out / 'final' / 'model.safetensors').is_file()}")
before_hash = run_tree(out)
code = run("weights kept (26)", "… the same command with --resume auto", argv(out, "--eval-data", str(EVAL),
                                                                             "--resume", "auto"), look_for="finished")
holds(code == 0 and run_tree(out) == before_hash, f"run folder unchanged: {run_tree(out) == before_hash}")
out = ROOT / "sig-save"
code, *_ = proc("weights kept (26)", "SIGTERM during the final save (--save-steps 0)", ["save", "SIGTERM", *argv(out)],
                python=SIGNAL_AT)
holds(code == 75 and (out / "final" / "model.safetensors").is_file() and not (out / ".tmp-final").exists(),
      f"final/ whole: {(out / 'final' / 'config.json').is_file()}")
out = ROOT / "sig-setup"
code, *_ = proc("weights kept (26)", "SIGINT during setup (tokenizing)", ["setup", "SIGINT", *argv(out)],
                python=SIGNAL_AT)
holds(code == 75 and not out.exists() and not stagings(), f"folder made: {out.exists()}; staged data left: "
      f"{stagings()}")
out = ROOT / "kill-setup"
proc("weights kept (26)", "kill -9 during setup (the data staged in TMPDIR)", ["setup-kill", "SIGTERM", *argv(out)],
     python=SIGNAL_AT)
left = stagings()
with contextlib.redirect_stdout(io.StringIO()):
    main(argv(ROOT / "after-kill"))
ROWS.append(("weights kept (26)", "… the next run on this machine sweeps what the killed one staged", "",
             f"staged before: {len(left)}, after: {len(stagings())}"))
holds(bool(left) and not stagings())
for flag in ("auto", "true"):
    before_hash = run_tree(FINISHED)
    code = run("weights kept (26)", f"--resume {flag} on a finished run without checkpoints",
               argv(FINISHED, "--resume", flag), look_for="finished")
    holds(code == 0 and (FINISHED / "final" / "model.safetensors").is_file() and run_tree(FINISHED) == before_hash,
          f"final/, metrics and config unchanged: {run_tree(FINISHED) == before_hash}")

# --- writes outside the run folder, through a link, or into a page --------------------------------------------
out = ROOT / "xss"
shutil.copytree(FINISHED, out)
with open(out / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": "<script>alert(1)</script>", "split": "train", "loss": 0.5}) + "\n")
    f.write(json.dumps({"step": 3, "split": "train", "<img src=x onerror=alert(2)>": 1.0}) + "\n")
(out / "eval.json").write_text(json.dumps({"model": "<script>alert(3)</script>", "preference": {"pairs": 1}}))
code = run("writes (26)", "report: a <script> as a metrics step, a key, an eval.json value", ["report", str(out)])
page = (out / "report" / "report.html").read_text() if (out / "report" / "report.html").is_file() else ""
holds(code == 0 and page and not re.search(r"<script>alert|<img src=x", page), "no tag from a file in the page: "
      f"{not re.search(r'<script>alert|<img src=x', page)}")
for name, target in (("report", MINE / "folder"), ("report/report.html", MINE / "notes.txt")):
    out = ROOT / f"link-{name.replace('/', '-')}"
    shutil.copytree(FINISHED, out)
    (out / "report").mkdir(exist_ok=True)
    link(out / name, target)
    code = run("writes (26)", f"report RUN with a link planted at RUN/{name}", ["report", str(out)])
    holds(code == 2 and "symbolic link" in ROWS[-1][3])
out = ROOT / "link-eval"
shutil.copytree(FINISHED, out)
(out / "eval.json").symlink_to(MINE / "notes.txt")
t0 = time.perf_counter()
code = run("writes (26)", "eval --model RUN/final with a link at RUN/eval.json",
           ["eval", "--model", str(out / "final"), "--data", str(EVAL), "--generate", "0", "--kl-samples", "0"])
holds(code == 2 and "symbolic link" in ROWS[-1][3], f"refused in {time.perf_counter() - t0:.1f} s")
out = ROOT / "link-card"
shutil.copytree(FINISHED, out)
(out / "final" / "README.md").unlink()
(out / "final" / "README.md").symlink_to(MINE / "new-card.md")  # dangling
code = run("writes (26)", "push with a dangling final/README.md link", ["push", str(out), "me/model"])
holds(code == 2 and not (MINE / "new-card.md").exists(), f"link target created: {(MINE / 'new-card.md').exists()}")
out = ROOT / "link-upload"
shutil.copytree(FINISHED, out)
(out / "final" / "secrets.txt").symlink_to(MINE / "notes.txt")
code = run("writes (26)", "push of a final/ holding a link to a file outside", ["push", str(out), "me/model"])
holds(code == 2 and "symbolic link" in ROWS[-1][3])
(ROOT / "gen.jsonl").symlink_to(MINE / "notes.txt")
code = run("writes (26)", "generate --output through a link", ["generate", "--model", str(MODEL), "--prompt", "hi",
                                                               "--max-new-tokens", "2", "--output",
                                                               str(ROOT / "gen.jsonl")])
holds(code == 2 and "symbolic link" in ROWS[-1][3])
(ROOT / "audit.json").symlink_to(MINE / "notes.txt")
code = run("writes (26)", "inspect --output through a link", ["inspect", str(DATA), "--output", str(ROOT / "audit.json")])
holds(code == 2 and "symbolic link" in ROWS[-1][3])
shared = ROOT / "shared"
with contextlib.redirect_stdout(io.StringIO()):
    main(argv(ROOT / "shared-run", "--data-cache-dir", str(shared)))
key = next(p.name for p in shared.iterdir() if not p.name.startswith("."))
dead = subprocess.Popen(["true"])
dead.wait()
host = re.sub(r"[^\w.]", "_", __import__("socket").gethostname())[:64]
for name in (f".tmp-{key}-{host}-{dead.pid}", f".tmp-{key}-{dead.pid}"):
    (shared / name / "data").mkdir(parents=True)
    (shared / name / "data" / "ids.bin").write_bytes(b"\0" * 4096)
(shared / key / "data" / "ids.bin").write_bytes(b"")  # and force a rebuild, which sweeps first
code = run("writes (26)", "a shared cache with staging folders of a dead process", argv(
    ROOT / "shared-run2", "--data-cache-dir", str(shared)), look_for="unusable")
holds(code == 0 and not list(shared.glob(".tmp-*")), f"left: {[p.name for p in shared.glob('.tmp-*')]}")

# --- no stale reuse: identity of what was loaded ---------------------------------------------------------------
both = ROOT / "both-weights"
shutil.copytree(MODEL, both)
from safetensors.torch import load_file as _load  # noqa: E402

torch.save({k: torch.zeros_like(v) for k, v in _load(str(MODEL / "model.safetensors")).items()},
           both / "pytorch_model.bin")
code = run("no stale reuse (26)", "--allow-pickle with pytorch_model.bin (zeros) beside model.safetensors",
           argv(ROOT / "o-both", "--allow-pickle", model=both), look_for="done")
# the policy's log-probs at step 1 are the loaded weights' (all-zero weights would give every token 1/vocabulary)
want = last_lines(FINISHED)[0]["logps/chosen"]
got = last_lines(ROOT / "o-both")[0]["logps/chosen"] if code == 0 else None
holds(code == 0 and got == want, f"step-1 logps/chosen {got} (model.safetensors alone: {want})")
code_model = ROOT / "code-model"
shutil.copytree(MODEL, code_model)
(code_model / "modeling_extra.py").write_text("X = 1\n")
with contextlib.redirect_stdout(io.StringIO()):
    main(argv(ROOT / "o-code", model=code_model))
(code_model / "modeling_extra.py").write_text("X = 2  # edited\n")
code = run("no stale reuse (26)", "remote-code .py edited: the reference cache", argv(ROOT / "o-code", "--overwrite",
                                                                                    model=code_model))
n = len(list((ROOT / "o-code" / "reference_logps").glob("train-*")))
holds(code == 0 and n == 2, f"reference caches: {n} (one per model code)")
hub = Path(os.environ["HF_HUB_CACHE"]) / "models--org--tiny"
for commit, src in (("a" * 40, MODEL), ("b" * 40, other_model)):
    shutil.copytree(src, hub / "snapshots" / commit)
(hub / "refs").mkdir()
(hub / "refs" / "main").write_text("a" * 40)
with contextlib.redirect_stdout(io.StringIO()):
    main(argv(ROOT / "o-hub", model="org/tiny"))
(hub / "refs" / "main").write_text("b" * 40)  # a new revision of the same hub name
code = run("no stale reuse (26)", "hub model: a new revision of the same name", argv(ROOT / "o-hub", "--overwrite",
                                                                                   model="org/tiny"))
n = len(list((ROOT / "o-hub" / "reference_logps").glob("train-*")))
holds(code == 0 and n == 2, f"reference caches: {n} (one per revision)")


def cache_entry(out: Path) -> Path:
    return next(p for p in (out / "data_cache").iterdir() if not p.name.startswith("."))


for case, damage in (("ids.bin edited (one token changed)", "edit"), ("ids.bin truncated", "cut"),
                     ("lengths.bin missing", "missing"), ("an id beyond the vocabulary in ids.bin", "vocab")):
    out = ROOT / f"cache-{damage}"
    shutil.copytree(FINISHED, out)
    ids = cache_entry(out) / "data" / "ids.bin"
    raw = bytearray(ids.read_bytes())
    if damage == "edit":
        raw[10:12] = (int.from_bytes(raw[10:12], "little") % 300 + 1).to_bytes(2, "little")
        ids.write_bytes(raw)
    elif damage == "cut":
        ids.write_bytes(raw[:len(raw) // 2])
    elif damage == "missing":
        (ids.parent / "lengths.bin").unlink()
    else:
        raw[10:12] = (65000).to_bytes(2, "little")
        ids.write_bytes(raw)
    code = run("no stale reuse (26)", f"data-cache entry: {case}", argv(out, "--overwrite"), look_for="unusable")
    holds(code == 0 and "tokenizing the data again" in ROWS[-1][3]
          and last_lines(out)[-1]["loss"] == last_lines(FINISHED)[-1]["loss"], "same losses as the intact run")
rel = ROOT / "rel"
rel.mkdir()
shutil.copytree(MODEL, rel / "base")
cwd = os.getcwd()
os.chdir(rel)
with contextlib.redirect_stdout(io.StringIO()):
    main(argv("run", "--eval-data", str(EVAL), model="base"))  # relative paths, as a user types them
elsewhere = ROOT / "elsewhere"
shutil.copytree(other_model, elsewhere / "base")  # another model under the same relative name
os.chdir(elsewhere)
code = run("no stale reuse (26)", "eval RUN/final from another directory holding another ./base",
           ["eval", "--model", str(rel / "run" / "final"), "--data", str(EVAL), "--generate", "0", "--kl-samples", "0",
            "--output", str(ROOT / "rel-eval.json")], look_for="eval of")
ref = json.loads((ROOT / "rel-eval.json").read_text()).get("reference") if code == 0 else None
holds(code == 0 and ref == str(rel / "base"), f"reference {ref}")
os.chdir(cwd)
torch.manual_seed(0)
from transformers import AutoModelForCausalLM  # noqa: E402

AutoModelForCausalLM.from_pretrained(other_model).save_pretrained(rel / "base")  # the run's base, replaced
code = run("no stale reuse (26)", "eval RUN/final when the run's base now holds another model",
           ["eval", "--model", str(rel / "run" / "final"), "--data", str(EVAL), "--generate", "0", "--kl-samples", "0",
            "--output", str(ROOT / "rel-eval2.json")])
holds(code == 2 and "another model" in ROWS[-1][3])


class Vanish(Callback):
    def __init__(self, out, how):
        self.out, self.how = out, how

    def on_step_end(self, state):
        if state.step == 1:
            shutil.rmtree(self.out) if self.how == "rm" else self.out.rename(self.out.with_name("moved"))


for how, case in (("rm", "rm -rf RUN during the run"), ("mv", "the run folder renamed during the run")):
    out = ROOT / f"vanish-{how}"
    code = run("no stale reuse (26)", case, argv(out, "--max-steps", "3", "--save-steps", "1"),
               callbacks=[Vanish(out, how)])
    moved = out.with_name("moved")
    holds(code == 2 and not out.exists() and (how == "rm" or (moved / ".preftune-run.json").is_file()),
          f"RUN recreated: {out.exists()}")
    shutil.rmtree(moved, ignore_errors=True)

# --- hangs and memory: each in its own process, under 1 GB and 30 s -----------------------------------------------
def config_variant(name: str, **values) -> Path:
    folder = ROOT / name
    shutil.copytree(MODEL, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(values)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


huge = config_variant("layers-1e6", num_hidden_layers=1_000_000)
code, _, _, rss, sec = proc("bounds (26)", "config.json num_hidden_layers: 1000000 (train)", argv(ROOT / "o-huge",
                                                                                                 model=huge))
holds(code == 2 and bounded(rss, sec))
text3 = config_variant("layers-text", num_hidden_layers="3")
neg = config_variant("vocab-neg", vocab_size=-5)
for case, args in (("train", argv(ROOT / "o-text3", model=text3)),
                   ("generate", ["generate", "--model", str(text3), "--prompt", "hi", "--max-new-tokens", "2"]),
                   ("plan", ["plan", "--model", str(text3)])):
    code, _, err, rss, sec = proc("traceback → sentence (26)", f'config.json "num_hidden_layers": "3" ({case})', args)
    holds(code == 2 and "Traceback" not in err and bounded(rss, sec))
code, _, err, rss, sec = proc("traceback → sentence (26)", "config.json vocab_size: -5 (plan)",
                              ["plan", "--model", str(neg)])
holds(code == 2 and "Traceback" not in err and bounded(rss, sec))
out = ROOT / "report-bomb"
shutil.copytree(FINISHED, out)
(out / "config.yaml").write_text(bomb.read_text())
code, _, err, rss, sec = proc("bounds (26)", "report: config.yaml is a YAML alias bomb", ["report", str(out)])
holds(code == 0 and bounded(rss, sec))
out = ROOT / "report-long"
shutil.copytree(FINISHED, out)
with open(out / "metrics.jsonl", "ab") as f:
    f.write(b'{"step": 99, "split": "train", "loss": "' + b"x" * (200 << 20) + b'"}\n')
code, _, err, rss, sec = proc("bounds (26)", "report: one 200 MB line in metrics.jsonl", ["report", str(out)])
holds(code == 0 and bounded(rss, sec))
(ROOT / "judge.py").write_text("def judge(prompt, a, b):\n    return 'x' * 100_000_000\n")
code, _, err, rss, sec = proc("messages (26)", "a judge returning a 100 MB string",
                              ["eval", "--model", str(FINISHED / "final"), "--reference", str(MODEL), "--data",
                               str(EVAL), "--generate", "2", "--kl-samples", "0", "--max-new-tokens", "2",
                               "--judge", f"{ROOT / 'judge.py'}:judge", "--output", str(ROOT / "j.json")])
holds(code == 2 and len(err) < 2000 and bounded(rss, sec), f"stderr {len(err):,} characters")

# --- tracebacks → sentences -----------------------------------------------------------------------------------
(ROOT / "cachefile").write_text("x")
run("traceback → sentence (26)", "--data-cache-dir is a file", argv(ROOT / "o-cf", "--data-cache-dir",
                                                                    str(ROOT / "cachefile")))
holds(ROWS[-1][2] == "2" and "is a file" in ROWS[-1][3])
run("traceback → sentence (26)", "--data-cache-dir cannot be created (a parent is a file)",
    argv(ROOT / "o-cf2", "--data-cache-dir", str(ROOT / "cachefile" / "sub")))
holds(ROWS[-1][2] == "2" and "data_cache_dir" in ROWS[-1][3])
pick = ROOT / "pickle-model"
shutil.copytree(MODEL, pick)
(pick / "model.safetensors").unlink()
(pick / "pytorch_model.bin").write_bytes(__import__("pickle").dumps(Path("not weights"), protocol=2))
run("traceback → sentence (26)", "--allow-pickle on a pickle that is not weights",
    argv(ROOT / "o-pick", "--allow-pickle", model=pick))
holds(ROWS[-1][2] == "2")
out = ROOT / "report-odd"
shutil.copytree(FINISHED, out)
with open(out / "metrics.jsonl", "ab") as f:
    f.write(b'[1, 2]\n{"split": "train", "loss": 1}\n{"step": "7", "split": "train", "loss": 1}\n'
            b'{"step": 8, "split": "train", "loss": "\xff\xfe"}\n"just text"\n{"step": 9, "split": 5}\n')
(out / "eval.json").write_text(json.dumps({"preference": [1, 2], "kl": "x", "judge": {"ci95": 5},
                                           "side_by_side": [1, {"prompt": None}]}))
code = run("traceback → sentence (26)", "report on odd metrics rows (a list, no step, a text step, non-UTF-8 bytes, "
           "a bare string) and an odd eval.json", ["report", str(out)], look_for="not metrics rows")
holds(code == 0)
out = ROOT / "report-noeval"
shutil.copytree(FINISHED, out)
code = run("report page (25)", "report of a run without evaluations: no empty eval column", ["report", str(out)])
page = (out / "report" / "report.html").read_text() if code == 0 else ""
holds(code == 0 and "eval (step" not in page)
generate_mod = importlib.import_module("preftune.generate")
evaluate_mod = importlib.import_module("preftune.evaluate")
report_mod = importlib.import_module("preftune.outputs.report")
hub_mod = importlib.import_module("preftune.hub")
api("traceback → sentence (26)", "generate(None, None, ['hi'])", lambda: generate_mod.generate(None, None, ["hi"]))
api("traceback → sentence (26)", "run_eval(model=5, data=...)", lambda: evaluate_mod.run_eval(5, str(EVAL)))
api("traceback → sentence (26)", "write_report(5)", lambda: report_mod.write_report(5))
api("traceback → sentence (26)", "push_run(None, 'me/model')", lambda: hub_mod.push_run(None, "me/model"))

# --- messages ---------------------------------------------------------------------------------------------------
out = ROOT / "cache-inside"
code = run("messages (26)", "--data-cache-dir inside a fresh --output-dir",
           argv(out, "--data-cache-dir", str(out / "cache")))
first = (code, out.exists())
code = run("messages (26)", "… then the same folder without it", argv(out), look_for="done")
holds(first == (2, False) and code == 0, f"first: exit {first[0]}, folder made {first[1]}")

onpolicy_writes()
print_table(before)
