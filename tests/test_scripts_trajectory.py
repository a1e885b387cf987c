"""scripts/speed and scripts/mtt: the row scripts are current, parse, resolve to the presets, make the experts the
distillation reads, and quote every expansion."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

import distill
from utils.datasets import get_dataset_spec
from utils.errors import UserError
from utils.speed import SPEED_PRESETS, speed_preset

ROOT = Path(distill.__file__).resolve().parent
ROW = re.compile(r"[a-z0-9]+_ipc\d+\.sh")
COUNTS = {"speed": 21, "mtt": 9}
KEYS = {"CIFAR10": "cifar10", "CIFAR100": "cifar100", "TinyImageNet": "tiny"}  # file names; subsets by name
SPEED_FIELDS = ("model", "n_per_class", "num_saet", "dim", "depth", "heads", "patch", "top_k", "l1_weight",
                "batch_syn", "syn_steps", "max_start_epoch")


def rows(method: str) -> list[Path]:
    return sorted(p for p in (ROOT / "scripts" / method).glob("*.sh") if ROW.fullmatch(p.name))


def commands(text: str, program: str) -> list[str]:
    """The `"$PYTHON" <program> ...` command lines of a script, continuation lines joined."""
    return [line for line in text.replace("\\\n", " ").splitlines() if line.startswith(f'"$PYTHON" {program} ')]


def args(command: str) -> dict:
    """--dataset/--subset/--ipc/--method values (None when absent) and whether --zca is given."""
    got = {k: (m[1] if (m := re.search(rf"--{k} (\S+)", command)) else None)
           for k in ("dataset", "subset", "ipc", "method")}
    got["zca"] = re.search(r"(?:^|\s)--zca(?:\s|$)", command) is not None
    return got


def unquoted_dollars(line: str) -> list[int]:
    """Positions of the `$` that bash expands outside double quotes (word splitting and globbing apply there);
    single quotes expand nothing, a comment ends the line, and inside "$(...)" quoting starts afresh, as in bash."""
    stack, found, i = [""], [], 0   # contexts: "" top level, "(" command substitution, '"', "'"
    while i < len(line):
        c, ctx = line[i], stack[-1]
        if ctx == "'":
            if c == "'":
                stack.pop()
        elif ctx == '"':
            if c == "\\":
                i += 1
            elif c == '"':
                stack.pop()
            elif line.startswith("$(", i):
                stack.append("(")
                i += 1
        else:
            if c == "#" and ctx == "" and (i == 0 or line[i - 1] in " \t"):
                break
            if c == "\\":
                i += 1
            elif c in "'\"":
                stack.append(c)
            elif c == ")" and ctx == "(":
                stack.pop()
            elif c == "$":
                found.append(i)
        i += 1
    return found


def test_generators_check_pass():
    """Both generators' `--check` (in one fresh interpreter, which imports distill.py once for the two)."""
    run_both = ("import runpy, sys\n"
                "rc = 0\n"
                "for path in sys.argv[1:]:\n"
                "    sys.argv = [path, '--check']\n"
                "    try:\n"
                "        runpy.run_path(path, run_name='__main__')\n"
                "    except SystemExit as e:\n"
                "        rc |= 1 if e.code else 0\n"
                "sys.exit(rc)\n")
    generators = [str(ROOT / "scripts" / m / "make_scripts.py") for m in COUNTS]
    r = subprocess.run([sys.executable, "-c", run_both, *generators], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("scripts up to date") == len(COUNTS), r.stdout


def test_row_counts_and_bash_syntax():
    paths = []
    for method, count in COUNTS.items():
        found = rows(method)
        assert len(found) == count, (method, [p.name for p in found])
        paths += found
    paths.append(ROOT / "scripts" / "slurm" / "distill.sbatch")
    r = subprocess.run(["bash", "-c", 'for f; do bash -n "$f" || { echo "$f"; exit 1; }; done', "bash",
                        *map(str, paths)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def check_steps(path: Path, method: str) -> tuple[dict, str, str]:
    """The distill step's arguments; the buffer step must make the experts it reads, validate.py evaluate its set."""
    text = path.read_text()
    (dist,), (buf,), (val,) = (commands(text, p) for p in ("distill.py", "buffer.py", "validate.py"))
    a, b = args(dist), args(buf)
    assert (b["dataset"], b["subset"], b["zca"]) == (a["dataset"], a["subset"], a["zca"]), path.name
    assert '--buffer-path "$BUFFERS"' in buf and '--buffer-path "$BUFFERS"' in dist, path.name
    assert '--num-experts "$EXPERTS" --train-epochs "$EPOCHS"' in buf, path.name
    assert '--out "$OUT/set"' in dist and '--syn "$OUT/set"' in val and f"--preset {method}" in val, path.name
    assert (a["method"] or "speed") == method, path.name
    spec = get_dataset_spec(a["subset"] or a["dataset"])
    assert path.name == f"{KEYS.get(spec.name, spec.name)}_ipc{a['ipc']}.sh"
    return a, buf, dist


def test_speed_rows_resolve_to_the_published_presets():
    seen = set()
    for p in rows("speed"):
        if p.name == "tiny_ipc50.sh":  # in the README table, but no configuration was published
            text = p.read_text()
            assert not commands(text, "distill.py") and not commands(text, "buffer.py") and "\nexit 1\n" in text
            with pytest.raises(UserError):
                speed_preset("TinyImageNet", 50)
            r = subprocess.run(["bash", str(p)], capture_output=True, text=True)
            assert r.returncode == 1 and "no TinyImageNet IPC 50 configuration" in r.stderr
            continue
        a, _, _ = check_steps(p, "speed")
        spec, ipc = get_dataset_spec(a["subset"] or a["dataset"]), int(a["ipc"])
        cfg, ref = distill.resolve_config("speed", spec, ipc, {}), speed_preset(spec.name, ipc)
        assert {f: getattr(cfg, f) for f in SPEED_FIELDS} == {f: getattr(ref, f) for f in SPEED_FIELDS}, p.name
        assert a["zca"] == (spec.name in ("CIFAR10", "CIFAR100")), p.name   # speed.md §1.1: ZCA for CIFAR only
        assert (a["dataset"] == "ImageNet") == (a["subset"] is not None), p.name
        seen.add((spec.name, ipc))
    assert seen == set(SPEED_PRESETS)


def test_mtt_rows_resolve_to_the_mtt_presets():
    seen = set()
    for p in rows("mtt"):
        a, buf, _ = check_steps(p, "mtt")
        spec, ipc = get_dataset_spec(a["dataset"]), int(a["ipc"])
        cfg = distill.resolve_config("mtt", spec, ipc, {})
        expected = {**distill.MTT_COMMON, **distill.MTT_PRESETS[(spec.name, ipc)]}
        assert {k: getattr(cfg, k) for k in expected} == expected, p.name
        assert a["zca"] == distill.MTT_ZCA[(spec.name, ipc)], p.name   # also the expert folder (_NO_ZCA)
        assert "--no-batch-standardize" in buf, p.name                 # MTT's experts (speed.md §1.3)
        assert 'BUFFERS="${BUFFERS:-buffers/mtt}"' in p.read_text()     # apart from SPEED's experts
        seen.add((spec.name, ipc))
    assert seen == set(distill.MTT_PRESETS)


def test_every_expansion_is_quoted():
    assert unquoted_dollars('echo $A') and unquoted_dollars('cd "$(dirname $0)"') and unquoted_dollars('x=$(pwd)')
    assert not unquoted_dollars('cd "$(dirname "$0")/../.."') and not unquoted_dollars("echo '$A'  # $B")
    assert not unquoted_dollars('OUT="${OUT:-results/x}"') and not unquoted_dollars('"$P" a.py --x "$OUT/set" \\')
    bad = [f"{p.name}:{n}: {line}" for method in COUNTS for p in rows(method)
           for n, line in enumerate(p.read_text().splitlines(), 1) if unquoted_dollars(line)]
    assert not bad, "\n".join(bad)
