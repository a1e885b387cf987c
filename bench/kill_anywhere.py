"""Kill every stage with SIGKILL at a uniformly random moment, re-run the same command, and check that it ends with
the same artefacts as an uninterrupted run, on real data (Fashion-MNIST, small per-class subsets).

    python bench/kill_anywhere.py                                 # every stage, 5 trials each (~15-20 min, 1 core)
    python bench/kill_anywhere.py --stages squeeze,relabel --trials 2
    python bench/kill_anywhere.py --double-kill                   # kill the resumed run once more

The tests (tests/test_resume_*.py, tests/test_signals.py) kill at fixed points of tiny synthetic runs; this bench
draws the kill time. For each stage:

1. the command runs uninterrupted into <work>/<stage>/ref and once more into <work>/<stage>/control; T is the
   shorter of the two wall times;
2. each trial runs the same command into a fresh folder and kills it (SIGKILL) at a time drawn uniformly from
   (0.05 T, 0.95 T) (numpy's default_rng seeded by --seed and the stage name, so a stage's draws do not depend on
   which other stages run). With --double-kill the re-run is killed once more, at a fraction drawn from
   (0.05, 0.95) of the part of T the first run did not reach (the re-run also repeats start-up and any work since
   the last checkpoint, so this kill lands before it would end). Then the same command runs to completion;
3. the control run is compared with the reference first: whatever differs between the two is not reproducible at
   all, so it is reported and left out of the trials' verdict;
4. every file of the trial folder is compared with the reference's (same set of relative paths, stale temp files
   of atomic writes listed apart):
   - .pt: loaded with torch.load(weights_only=True) and compared recursively, every tensor with torch.equal (dtype
     and shape included), other values with == (a numpy RNG state, keys + position, counts as one value);
     relabel's soft-label batch files also by payload bytes (every member of the torch zip archive but its name
     prefix and serialization id: torch.save puts the temp file's name into the archive, so whole-file bytes of a
     .pt written atomically never match);
   - images (.jpg/.png): bytes;
   - .csv: every column whose name says it is a wall-clock time (second/time/elapsed/wall/duration) is dropped,
     the rest compared cell by cell; .json (and dicts inside .pt files): keys named that way (or created/date)
     dropped, the rest compared recursively;
   - any other file: bytes.
   In strings the run folder's own path is replaced by <RUN> before comparing (configs record where they wrote).
5. the summary (stage, trials, kill fractions, trials that had resume state on disk at the kill, matches, T, what
   was compared) is printed and written to --out; trials.csv beside it has one row per trial.

Every process runs with OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 (the reference too: a different thread count changes
float sums) and one at a time. A trial that matches is deleted unless --keep; one that does not is kept with its
differences in <work>/<stage>/logs/. The git HEAD and a hash of the sources are taken at the start and the end: when
they differ (someone committed or edited meanwhile) the bench says so and exits 3 (exit 1: a trial differs).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TIME_NAME = re.compile(r"second|time|elapsed|wall|duration|created|date", re.I)   # wall-clock fields
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
NUMPY_STATE = {"keys", "pos", "has_gauss", "cached"}
DATASET = "FashionMNIST"
EXPERT_NET = "ConvNet-2-w16"


# ------------------------------------------------------------------------------------------------ stages

@dataclass
class Stage:
    name: str
    script: str
    flags: Callable[["Inputs", Path], list]     # (inputs, run folder) -> command-line flags
    resume_globs: tuple[str, ...]               # files that carry progress a re-run continues from
    payload_globs: tuple[str, ...] = ()         # .pt files also compared by payload bytes

    def cmd(self, inputs: "Inputs", run: Path) -> list[str]:
        return [sys.executable, str(ROOT / self.script), *map(str, self.flags(inputs, run))]


def _buffer(i, run):
    return ["-d", DATASET, "--data-path", i.data, "--model", EXPERT_NET, "--train-subset", 30, "--num-experts", 3,
            "--train-epochs", 12, "--save-interval", 1, "--test-per-class", 10, "--no-batch-standardize",
            "--ckpt-every", 3, "--seed", 0, "--device", "cpu", "--buffer-path", run, "--quiet"]


def _distill(i, run):
    # lr-img / lr-lr / lr-floor lowered from the CIFAR preset: with these experts the preset's learned lr turns
    # negative in the first iteration
    return ["-d", DATASET, "--method", "mtt", "--ipc", 1, "--model", EXPERT_NET, "--data-path", i.data,
            "--expert-dir", i.experts(), "--iterations", 60, "--syn-steps", 10, "--max-start-epoch", 4,
            "--lr-img", 100, "--lr-lr", 1e-7, "--lr-floor", 1e-3, "--seed", 0, "--ckpt-every", 12,
            "--device", "cpu", "--out", run, "--quiet"]


def _condense(dream: bool):
    def flags(i, run):
        return ["-d", DATASET, "--data-path", i.data, "--ipc", 1, "-f", 2, "--reproduce", "--net", "ConvNet-3-w32",
                "--train-subset", 20, "--outer-iterations", 10, "--inner-loop", 2, "--batch-real", 8, "--n-data", 16,
                *(["--dream"] if dream else []), "--seed", 0, "--ckpt-every", 2, "--device", "cpu", "--out", run,
                "--quiet"]
    return flags


def _squeeze(i, run):
    # 2,000 images in batches of 32: 63 steps an epoch, 504 in all; a checkpoint every 100 steps (and every epoch)
    return ["-d", DATASET, "--data-path", i.data, "--arch", "ConvNet-3-BN-w16", "--train-per-class", 200,
            "--test-per-class", 20, "--epochs", 8, "--batch-size", 32, "--eval-every", 2, "--seed", 0,
            "--ckpt-every", 100, "--device", "cpu", "--out", run / "teacher.pt", "--quiet"]


RECOVER = {   # method -> flags; 4 units of 10 images each
    "sre2l": ["--method", "sre2l", "--ipc", 4, "--iterations", 300, "--ckpt-every", 60],
    "dwa": ["--method", "dwa", "--ipc", 4, "--iterations", 200, "--ckpt-every", 40],
    "delt": ["--method", "delt", "--ipc", 4, "--iterations", 200, "--round-iterations", 100, "--ckpt-every", 40],
}


def _recover(method: str):
    def flags(i, run):
        init = ["--init-path", i.init()] if method != "sre2l" else []
        return ["--teacher", i.teacher(), *RECOVER[method], *init, "--batch-size", 10, "--log-every", 10,
                "--seed", 0, "--device", "cpu", "--out", run, "--quiet"]
    return flags


def _relabel(i, run):
    # every stored batch file is the stage's checkpoint: 300 epochs x 5 batches of 8
    return ["--syn", i.recovered(), "--teacher", i.teacher(), "--epochs", 300, "--batch-size", 8, "--seed", 42,
            "--device", "cpu", "--out", run, "--quiet"]


def _validate_ce(i, run):
    return ["--syn", i.coreset(), "--data-path", i.data, "--model", "ConvNet-2-w16", "--epochs", 100, "--runs", 2,
            "--batch-size", 32, "--test-per-class", 20, "--seed", 0, "--ckpt-every", 20, "--device", "cpu",
            "--results", run / "r.json", "--quiet"]


def _validate_kd(i, run):
    return ["--syn", i.coreset(), "--data-path", i.data, "--teacher", i.teacher(), "--model", "ConvNet-2-BN-w16",
            "--epochs", 60, "--runs", 2, "--batch-size", 32, "--test-per-class", 20, "--seed", 0,
            "--ckpt-every", 12, "--device", "cpu", "--results", run / "r.json", "--quiet"]


STAGES = [
    Stage("buffer", "buffer.py", _buffer, ("**/expert_ckpt.pt", "**/partial.pt", "**/replay_buffer_*.pt")),
    Stage("distill-mtt", "distill.py", _distill, ("ckpt.pt",)),
    Stage("condense-idc", "condense.py", _condense(False), ("ckpt.pt",)),
    Stage("condense-dream", "condense.py", _condense(True), ("ckpt.pt",)),
    Stage("squeeze", "squeeze.py", _squeeze, ("*.ckpt",)),
    *(Stage(f"recover-{m}", "recover.py", _recover(m), (".units/*.json", ".units/group-*.ckpt.pt")) for m in RECOVER),
    Stage("relabel", "relabel.py", _relabel, ("epoch_*/batch_*.pt",), payload_globs=("epoch_*/batch_*.pt",)),
    Stage("validate-ce", "validate.py", _validate_ce, ("*.ckpt.pt", "r.csv")),
    Stage("validate-kd", "validate.py", _validate_kd, ("*.ckpt.pt", "r.csv")),
]
BY_NAME = {s.name: s for s in STAGES}


def run_logged(cmd: list, log: Path) -> tuple[int, float]:
    """Run to the end; (exit status, wall seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        t0 = time.monotonic()
        rc = subprocess.call(list(map(str, cmd)), cwd=ROOT, env=ONE_THREAD, stdout=f, stderr=subprocess.STDOUT)
        return rc, time.monotonic() - t0


class Inputs:
    """What the stages read that another stage (or a helper script) makes: built on first use. The reference runs
    double as inputs (the buffer stage's experts, the squeeze teacher, the SRe2L set), so each is made once."""

    def __init__(self, work: Path, data: str):
        self.work, self.data = work, data
        self.T: dict[str, float] = {}

    def ref(self, name: str) -> Path:
        """The uninterrupted run of a stage (timed on first use)."""
        stage, run = BY_NAME[name], self.work / name / "ref"
        if name not in self.T:
            if run.exists():
                shutil.rmtree(run)
            cmd = stage.cmd(self, run)
            rc, secs = run_logged(cmd, self.work / name / "logs" / "ref.log")
            if rc != 0:
                raise SystemExit(f"{name}: the uninterrupted run failed (exit {rc}); see "
                                 f"{self.work / name / 'logs' / 'ref.log'}")
            self.T[name] = secs
        return run

    def experts(self) -> Path:
        return self.ref("buffer") / DATASET / EXPERT_NET

    def teacher(self) -> Path:
        return self.ref("squeeze") / "teacher.pt"

    def recovered(self) -> Path:
        return self.ref("recover-sre2l")

    def init(self) -> Path:
        out = self.work / "inputs" / "init_medium"
        if not (out / "selection.json").exists():
            self._helper("rank_select.py", "--teacher", self.teacher(), "--data-path", self.data, "--ipc", 4,
                         "--selection", "medium", "--device", "cpu", "--out", out, "--quiet")
        return out

    def coreset(self) -> Path:
        out = self.work / "inputs" / "coreset_random10"
        if not (out / "synset.pt").exists():
            self._helper("coreset.py", "-d", DATASET, "--data-path", self.data, "--ipc", 10, "--method", "random",
                         "--seed", 0, "--out", out, "--overwrite")
        return out

    def _helper(self, script: str, *args) -> None:
        log = self.work / "inputs" / f"{Path(script).stem}.log"
        rc, _ = run_logged([sys.executable, ROOT / script, *args], log)
        if rc != 0:
            raise SystemExit(f"{script} failed (exit {rc}); see {log}")


# ------------------------------------------------------------------------------------------------ killing

def resume_state(stage: Stage, run: Path) -> list[str]:
    """The stage's resume files in `run` (checkpoints, finished units or batch files)."""
    return sorted({p.relative_to(run).as_posix() for g in stage.resume_globs for p in run.glob(g) if p.is_file()})


def listing(files: list[str] | None) -> str:
    """A short cell for trials.csv: relabel leaves hundreds of batch files."""
    if files is None:
        return "(run ended first)"
    if len(files) <= 6:
        return ";".join(files)
    return f"{len(files)} files: {files[0]} .. {files[-1]}"


def run_and_kill(cmd: list, at: float, log: Path) -> bool:
    """Start `cmd`, SIGKILL it `at` seconds after the start; False when it ended before (the kill missed)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=ONE_THREAD, stdout=f, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=at)
            return False
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return True


# ------------------------------------------------------------------------------------------------ comparing

@dataclass
class Comparison:
    diffs: dict[str, str] = field(default_factory=dict)  # where (file, key path or column) -> what differs
    kinds: Counter = field(default_factory=Counter)      # how many files were compared which way
    dropped: set[str] = field(default_factory=set)       # time-like columns / keys left out
    stale_tmp: list[str] = field(default_factory=list)   # temp files of interrupted atomic writes

    def differ(self, where: str, what: str) -> None:
        self.diffs.setdefault(where, what)

    def beyond(self, unstable: set[str]) -> dict[str, str]:
        """The differences at places where two uninterrupted runs agree."""
        return {w: d for w, d in self.diffs.items() if w not in unstable}


def _norm(s: str, run: Path) -> str:
    return s.replace(str(run.resolve()), "<RUN>").replace(str(run), "<RUN>")


def _scalar(x: Any) -> bool:
    return isinstance(x, (int, float, str, bool)) or x is None


def same_value(a: Any, b: Any, where: str, ra: Path, rb: Path, c: Comparison) -> None:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return c.differ(where, f"tensor vs {type(b).__name__ if isinstance(a, torch.Tensor) else type(a)}")
        if a.dtype != b.dtype or a.shape != b.shape:
            return c.differ(where, f"{a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
        if torch.equal(a, b):
            return
        if a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()):
            return   # NaN in the same places (torch.equal treats NaN != NaN)
        n = int((a != b).sum())
        gap = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else None
        return c.differ(where, f"{n} of {a.numel()} elements differ" + (f" (max |diff| {gap:.3g})" if gap else ""))
    if isinstance(a, dict) and isinstance(b, dict) and set(a) == set(b) == NUMPY_STATE:
        # a numpy RNG state (utils/checkpoint.capture_rng) is one value: its position means nothing without its keys
        if not all(_same_value_quiet(a[k], b[k]) for k in NUMPY_STATE):
            c.differ(where, "numpy RNG state differs (" + ", ".join(k for k in sorted(NUMPY_STATE)
                                                                   if not _same_value_quiet(a[k], b[k])) + ")")
        return
    if isinstance(a, dict) and isinstance(b, dict):
        def kept(d):
            out = {}
            for k, v in d.items():
                if isinstance(k, str) and TIME_NAME.search(k):
                    c.dropped.add(k)
                else:
                    out[k] = v
            return out
        a, b = kept(a), kept(b)
        if set(a) != set(b):
            return c.differ(where, f"keys only in ref {sorted(map(str, set(a) - set(b)))}, only in trial "
                                   f"{sorted(map(str, set(b) - set(a)))}")
        for k in a:
            same_value(a[k], b[k], f"{where}.{k}", ra, rb, c)
        return
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return c.differ(where, f"length {len(a)} vs {len(b)}")
        if all(map(_scalar, a)) and all(map(_scalar, b)):   # one verdict for a list of plain values
            bad = [k for k, (x, y) in enumerate(zip(a, b)) if not _same_scalar(x, y, ra, rb)]
            if bad:
                c.differ(where, f"{len(bad)} of {len(a)} entries differ (first at {bad[0]}: {str(a[bad[0]])[:60]} "
                                f"vs {str(b[bad[0]])[:60]})")
            return
        for k, (x, y) in enumerate(zip(a, b)):
            same_value(x, y, f"{where}[{k}]", ra, rb, c)
        return
    if not _same_scalar(a, b, ra, rb):
        c.differ(where, f"{str(a)[:80]!r} vs {str(b)[:80]!r}")


def _same_value_quiet(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return type(a) is type(b) and a == b


def _same_scalar(a: Any, b: Any, ra: Path, rb: Path) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return _norm(a, ra) == _norm(b, rb)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def pt_payload(path: Path) -> dict[str, bytes]:
    """The members of a torch.save zip archive without the archive's name prefix and its serialization id."""
    with zipfile.ZipFile(path) as z:
        return {n.split("/", 1)[1]: z.read(n) for n in z.namelist()
                if not n.endswith(".data/serialization_id")}


def compare_csv(fa: Path, fb: Path, rel: str, ra: Path, rb: Path, c: Comparison) -> None:
    ta, tb = (list(csv.reader(f.open(newline=""))) for f in (fa, fb))
    if not ta or not tb or ta[0] != tb[0]:
        return c.differ(rel, f"header {ta[:1]} vs {tb[:1]}")
    c.dropped.update(name for name in ta[0] if TIME_NAME.search(name))
    if len(ta) != len(tb):
        c.differ(f"{rel}:rows", f"{len(ta) - 1} vs {len(tb) - 1} rows")
    for k, name in enumerate(ta[0]):
        if TIME_NAME.search(name):
            continue
        for n, (x, y) in enumerate(zip(ta[1:], tb[1:]), start=1):
            u, v = (_norm(x[k], ra) if k < len(x) else None), (_norm(y[k], rb) if k < len(y) else None)
            if u != v:
                c.differ(f"{rel}:{name}", f"first at row {n}: {u!r} vs {v!r}")
                break


def compare_runs(stage: Stage, ref: Path, got: Path) -> Comparison:
    c = Comparison()

    def files(root: Path) -> set[str]:
        out = set()
        for p in root.rglob("*"):
            if p.is_file():
                rel = p.relative_to(root).as_posix()
                if p.name.startswith(".") and p.name.endswith(".tmp"):
                    if root == got:
                        c.stale_tmp.append(rel)
                    continue
                out.add(rel)
        return out

    fa, fb = files(ref), files(got)
    if fa != fb:
        c.differ("<files>", f"only in ref {sorted(fa - fb)[:5]}, only in trial {sorted(fb - fa)[:5]}")
    payload = {p.relative_to(ref).as_posix() for g in stage.payload_globs for p in ref.glob(g)}
    for rel in sorted(fa & fb):
        a, b = ref / rel, got / rel
        suffix = a.suffix.lower()
        if suffix == ".pt" or a.name.endswith(".ckpt"):
            c.kinds["pt: tensors"] += 1
            same_value(torch.load(a, weights_only=True), torch.load(b, weights_only=True), rel, ref, got, c)
            if rel in payload:
                c.kinds["pt: payload bytes"] += 1
                if pt_payload(a) != pt_payload(b):
                    c.differ(f"{rel}:payload", "payload bytes differ")
        elif suffix in IMAGE_SUFFIXES:
            c.kinds["images: bytes"] += 1
            if a.read_bytes() != b.read_bytes():
                c.differ(rel, "bytes differ")
        elif suffix == ".csv":
            c.kinds["csv: non-time columns"] += 1
            compare_csv(a, b, rel, ref, got, c)
        elif suffix == ".json":
            c.kinds["json: non-time keys"] += 1
            same_value(json.loads(a.read_text()), json.loads(b.read_text()), rel, ref, got, c)
        else:
            c.kinds["other: bytes"] += 1
            if a.read_bytes() != b.read_bytes():
                c.differ(rel, "bytes differ")
    return c


# ------------------------------------------------------------------------------------------------ the bench

def kill_fractions(seed: int, name: str, trials: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    first = rng.uniform(0.05, 0.95, trials)
    second = rng.uniform(0.05, 0.95, trials)   # drawn always, so --double-kill leaves the first kills unchanged
    return first, second


def bench_stage(stage: Stage, inputs: Inputs, args, trial_rows: list[dict]) -> dict:
    ref = inputs.ref(stage.name)
    folder, logs = inputs.work / stage.name, inputs.work / stage.name / "logs"
    # a second uninterrupted run: what differs between it and the reference is not reproducible at all, so a
    # difference there says nothing about resuming; it is reported, and trials are judged on everything else
    control = folder / "control"
    rc, t_control = run_logged(stage.cmd(inputs, control), logs / "control.log")
    if rc != 0:
        raise SystemExit(f"{stage.name}: the second uninterrupted run failed (exit {rc}); see {logs / 'control.log'}")
    # T: the faster of the two (a first run can be slowed by cold file caches; a T too long lets late kills miss)
    T = min(inputs.T[stage.name], t_control)
    print(f"{stage.name}: T = {T:.1f} s (uninterrupted runs {inputs.T[stage.name]:.1f} s, {t_control:.1f} s); "
          f"{' '.join(map(str, stage.cmd(inputs, Path('<RUN>'))[1:]))}", flush=True)
    base = compare_runs(stage, ref, control)
    unstable = set(base.diffs)
    for where, what in base.diffs.items():
        print(f"  differs between two uninterrupted runs too: {where}: {what}", flush=True)
    if not args.keep:
        shutil.rmtree(control)

    first, second = kill_fractions(args.seed, stage.name, args.trials)
    row = {"stage": stage.name, "trials": args.trials, "kill_fracs": [], "second_kill_fracs": [],
           "ckpt_at_kill": 0, "missed_kills": 0, "matches": 0, "T_s": round(T, 2),
           "unstable_without_kill": " ".join(sorted(unstable)), "stale_tmp_trials": 0}
    compared: Counter = Counter()
    dropped: set[str] = set(base.dropped)
    for k in range(args.trials):
        run = folder / f"trial{k}"
        if run.exists():
            shutil.rmtree(run)
        cmd = stage.cmd(inputs, run)
        kills = [(float(first[k]), float(first[k]) * T)]
        if args.double_kill:
            frac = float(second[k] * (1 - first[k]))
            kills.append((frac, frac * T))
        landed, state_at_kill = [], []
        for n, (frac, at) in enumerate(kills):
            ok = run_and_kill(cmd, at, logs / f"trial{k}_kill{n + 1}.log")
            landed.append(ok)
            state_at_kill.append(resume_state(stage, run) if ok else None)
        rc, secs = run_logged(cmd, logs / f"trial{k}_final.log")
        if rc != 0:
            cmp = Comparison(diffs={"<exit>": f"the re-run exited {rc} (see {logs / f'trial{k}_final.log'})"})
        else:
            cmp = compare_runs(stage, ref, run)
        compared.update(cmp.kinds)
        dropped |= cmp.dropped
        real = cmp.beyond(unstable)
        match = not real
        row["kill_fracs"].append(kills[0][0])
        if args.double_kill:
            row["second_kill_fracs"].append(kills[1][0])
        row["ckpt_at_kill"] += bool(state_at_kill[0])
        row["missed_kills"] += sum(not x for x in landed)
        row["matches"] += match
        row["stale_tmp_trials"] += bool(cmp.stale_tmp)
        trial_rows.append({
            "stage": stage.name, "trial": k,
            "kill_frac": round(kills[0][0], 3), "kill_landed": landed[0],
            "state_at_kill": listing(state_at_kill[0]),
            "second_kill_frac": round(kills[1][0], 3) if args.double_kill else "",
            "second_kill_landed": landed[1] if args.double_kill else "",
            "state_at_second_kill": listing(state_at_kill[1]) if args.double_kill else "",
            "final_run_s": round(secs, 2), "match": match, "stale_tmp": ";".join(cmp.stale_tmp),
            "differences": " | ".join(f"{w}: {d}" for w, d in list(real.items())[:5])})
        kill_text = " then ".join(f"{f:.2f} T{'' if ok else ' (missed: the run had ended)'}"
                                  for (f, _), ok in zip(kills, landed))
        counts = " / ".join(str(len(x)) if x is not None else "-" for x in state_at_kill)
        print(f"  trial {k}: killed at {kill_text}; resume files on disk at the kill: {counts}; "
              f"{'MATCH' if match else 'DIFFERS'}"
              f"{'; stale temp files: ' + ', '.join(cmp.stale_tmp) if cmp.stale_tmp else ''}", flush=True)
        if match and not args.keep:
            shutil.rmtree(run)
        elif not match:
            (logs / f"trial{k}_differences.txt").write_text("".join(f"{w}: {d}\n" for w, d in real.items()))
            for w, d in list(real.items())[:10]:
                print(f"    {w}: {d}", flush=True)
    row["compared"] = ", ".join(f"{n} {kind}" for kind, n in sorted(compared.items())) + (
        f"; dropped: {', '.join(sorted(dropped))}" if dropped else "")
    return row


def code_version() -> str:
    """The git HEAD and a hash of every stage and library source file: other people may commit or edit while the
    bench runs, and a reference and a trial made by different code say nothing about resuming."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = "?"
    h = zlib.crc32(b"")
    for f in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("utils/**/*.py")) + sorted(ROOT.glob("networks/**/*.py")):
        h = zlib.crc32(f.read_bytes(), zlib.crc32(f.relative_to(ROOT).as_posix().encode(), h))
    return f"HEAD {head or '?'}, sources {h:08x}"


def main() -> None:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--trials", type=int, default=5, help="killed-and-resumed runs per stage")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times (numpy default_rng with the stage)")
    p.add_argument("--double-kill", action="store_true",
                   help="also kill the resumed run once, at a random moment, before the final re-run")
    p.add_argument("--stages", default=",".join(BY_NAME),
                   help=f"comma-separated stages (default all): {', '.join(BY_NAME)}")
    p.add_argument("--data-path", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST idx files")
    p.add_argument("--out", type=Path, default=Path("runs/kill_anywhere/summary.csv"),
                   help="summary CSV; trials.csv goes beside it")
    p.add_argument("--work", type=Path, default=None,
                   help="folder of the runs (default: work/ beside --out; emptied at the start)")
    p.add_argument("--keep", action="store_true", help="keep the folders of trials that match (default: delete)")
    args = p.parse_args()
    names = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; known: {', '.join(BY_NAME)}")
    if args.trials < 1:
        p.error("--trials must be at least 1")
    out = args.out if args.out.is_absolute() else ROOT / args.out
    work = (args.work or out.parent / "work")
    work = work if work.is_absolute() else ROOT / work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    inputs = Inputs(work, args.data_path)
    version = code_version()
    print(f"code: {version}", flush=True)
    start = time.monotonic()
    rows, trial_rows = [], []
    for name in names:
        rows.append(bench_stage(BY_NAME[name], inputs, args, trial_rows))
    wall = time.monotonic() - start

    out.parent.mkdir(parents=True, exist_ok=True)
    cols = ["stage", "trials", "kill_fracs", "second_kill_fracs", "ckpt_at_kill", "missed_kills", "matches", "T_s",
            "compared", "unstable_without_kill", "stale_tmp_trials"]
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "kill_fracs": " ".join(f"{x:.2f}" for x in r["kill_fracs"]),
                        "second_kill_fracs": " ".join(f"{x:.2f}" for x in r["second_kill_fracs"])})
    with open(out.parent / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(trial_rows[0]))
        w.writeheader()
        w.writerows(trial_rows)

    print("\n| stage | trials | kill at (fraction of T) | resume state on disk at kill | matches | T (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        fr = " ".join(f"{x:.2f}" for x in r["kill_fracs"])
        if r["second_kill_fracs"]:
            fr += " / then " + " ".join(f"{x:.2f}" for x in r["second_kill_fracs"])
        missed = f" ({r['missed_kills']} kill(s) missed)" if r["missed_kills"] else ""
        print(f"| {r['stage']} | {r['trials']} | {fr}{missed} | {r['ckpt_at_kill']}/{r['trials']} | "
              f"{r['matches']}/{r['trials']} | {r['T_s']:.1f} |")
    print("\ncompared per stage:")
    for r in rows:
        print(f"  {r['stage']}: {r['compared']}")
    for r in rows:
        if r["unstable_without_kill"]:
            print(f"  {r['stage']}: differs between two uninterrupted runs too, not judged: "
                  f"{r['unstable_without_kill']}")
        if r["stale_tmp_trials"]:
            print(f"  {r['stage']}: {r['stale_tmp_trials']} trial(s) left a stale temp file of an interrupted "
                  "atomic write (listed in trials.csv)")
    bad = sum(r["trials"] - r["matches"] for r in rows)
    print(f"\n{sum(r['matches'] for r in rows)}/{sum(r['trials'] for r in rows)} trials match; wall {wall:.0f} s; "
          f"summary {out}")
    after = code_version()
    if after != version:
        print(f"WARNING: the code changed while the bench ran ({version} -> {after}); references and trials may "
              "come from different code: run it again", flush=True)
        sys.exit(3)
    print(f"code unchanged while the bench ran ({after})")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
