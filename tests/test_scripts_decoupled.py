"""scripts/decoupled (SRe2L / DWA / DELT rows), the ImageNet-1K DELT scripts and the Slurm templates: the generated
scripts are current and parse; run with a stub interpreter (PYTHON) they call every stage in order, with options the
stage's own CLI accepts, presets its tables know, and every path passed through intact (the paths contain spaces,
so an unquoted expansion would split them); the ImageNet scripts stop with a one-line error before starting
anything; the sbatch templates hand recover.py its shard and torchrun the job's GPUs."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

import rank_select
import recover
import relabel
import squeeze
import validate
from networks.registry import canonical_name
from utils.datasets import get_dataset_spec
from utils.distributed import DistInfo, resolve_shard

ROOT = Path(recover.__file__).resolve().parent
DEC = ROOT / "scripts" / "decoupled"
SYNTH = ROOT / "scripts" / "resnet18_imagenet1k_synthesis.sh"
VALID = ROOT / "scripts" / "resnet18_imagenet1k_validation.sh"
ARRAY = ROOT / "scripts" / "slurm" / "recover_array.sbatch"
TORCHRUN = ROOT / "scripts" / "slurm" / "torchrun.sbatch"
STAGES = {"squeeze.py": squeeze, "rank_select.py": rank_select, "recover.py": recover, "relabel.py": relabel,
          "validate.py": validate}
COMMANDS = {name: typer.main.get_command(m.app) for name, m in STAGES.items()}

# decoupled.md §7: DWA (§7.1), DELT (§7.2) and SRe2L (§7.3) rows, one script each
EXPECTED_ROWS = {
    "dwa": {"cifar10": (10, 50), "cifar100": (10, 50), "tiny": (50, 100), "in1k": (10, 50, 100)},
    "delt": {"cifar10": (1, 10, 50), "imagenette": (1, 10, 50), "tiny": (1, 10, 50), "imagenet100": (10, 50, 100),
             "in1k": (10, 50, 100)},
    "sre2l": {"cifar100": (50,), "tiny": (50, 100), "in1k": (10, 50, 100, 200)},
}
REGISTRY = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "tiny": "TinyImageNet", "imagenette": "imagenette",
            "imagenet100": "ImageNet100", "in1k": "ImageNet"}
ROW = re.compile(r"(sre2l|dwa|delt)_([a-z0-9]+)_ipc(\d+)\.sh")

# The stub interpreter: records its arguments (and the shard variables) as one JSON line; runs the validation
# script's inline summary for real; with FAKE_RESULTS, "validate.py" writes a report whose accuracies derive from
# the seed, so that the summary can be checked by hand.
STUB = """#!{python} -S
import json, os, sys
args = sys.argv[1:]
env = {{k: os.environ.get(k) for k in ("LAUNCH", "STEPS", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN",
                                      "SLURM_ARRAY_TASK_COUNT")}}
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({{"argv": args, "env": env}}) + "\\n")
if args[:1] == ["-"]:
    os.execv(sys.executable, [sys.executable, *args])
if "validate.py" in args and os.environ.get("FAKE_RESULTS"):
    seed = int(args[args.index("--seed") + 1])
    model = args[args.index("--model") + 1]
    out = args[args.index("--results") + 1]
    report = {{"model": model, "by_model": {{model: {{"syn": {{"runs": [seed / 10000]}},
                                                  "random": {{"runs": [seed / 20000]}}}}}}}}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f)
"""


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    d = tmp_path_factory.mktemp("bin")
    path = d / "stub"
    path.write_text(STUB.format(python=sys.executable))
    path.chmod(0o755)
    return path


def run(cmd: list, env: dict, log: Path, cwd: Path = ROOT) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run a script with the stub; returns the result and the recorded calls."""
    log.unlink(missing_ok=True)
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LAUNCH", "STEPS", "GPUS"))}
    full.update(env, STUB_LOG=str(log))
    r = subprocess.run(["bash", *map(str, cmd)], env=full, cwd=cwd, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return r, calls


def parse(argv: list[str]) -> tuple[str, dict]:
    """(stage, options) as the stage's own typer/click command resolves them; unknown options or bad values
    raise."""
    stage = argv[0]
    ctx = COMMANDS[stage].make_context(stage, list(argv[1:]))
    return stage, ctx.params


def row_scripts() -> list[Path]:
    return sorted(p for p in DEC.glob("*.sh") if ROW.fullmatch(p.name))


def test_generator_is_current_and_covers_every_table_row():
    spec = importlib.util.spec_from_file_location("decoupled_make_scripts", DEC / "make_scripts.py")
    gen = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gen   # its dataclasses look their module up there
    try:
        spec.loader.exec_module(gen)
    finally:
        sys.modules.pop(spec.name, None)
    assert gen.main(["--check"]) == 0
    expected = {f"{m}_{k}_ipc{ipc}.sh" for m, rows in EXPECTED_ROWS.items() for k, ipcs in rows.items()
                for ipc in ipcs}
    assert {p.name for p in row_scripts()} == expected and len(expected) == 31


def test_every_script_parses():
    paths = [*row_scripts(), SYNTH, VALID, ARRAY, TORCHRUN]
    r = subprocess.run(["bash", "-c", 'for f; do bash -n "$f" || { echo "$f"; exit 1; }; done', "bash",
                        *map(str, paths)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def row_env(tmp: Path, stub: Path) -> dict:
    base = tmp / "with space"
    weights = base / "resnet18 v1.pth"
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.write_bytes(b"x")
    return {"PYTHON": str(stub), "DATA": str(base / "data dir"), "OUT": str(base / "out dir"),
            "TEACHER": str(base / "teach er.pt"), "WEIGHTS": str(weights)}


def test_rows_call_each_stage_with_accepted_options_and_known_presets(tmp_path, stub):
    log = tmp_path / "calls.jsonl"
    env = row_env(tmp_path, stub)
    out, data, teacher = env["OUT"], env["DATA"], env["TEACHER"]
    for path in row_scripts():
        method, key, ipc = ROW.fullmatch(path.name).groups()
        ipc = int(ipc)
        variants = [{}, {"LABELS": "online"}] if (method, key) == ("sre2l", "in1k") else [{}]
        for extra in variants:
            r, calls = run([path], {**env, **extra}, log)
            assert r.returncode == 0, (path.name, r.stderr)
            parsed = [parse(c["argv"]) for c in calls]
            stages = [s for s, _ in parsed]
            expected = (["squeeze.py"] + (["rank_select.py"] if method != "sre2l" else []) + ["recover.py"]
                        + (["relabel.py"] if (method, key) == ("sre2l", "in1k") and not extra else [])
                        + ["validate.py"])
            assert stages == expected, (path.name, stages)
            p = dict(parsed)
            sq, rec, val = p["squeeze.py"], p["recover.py"], p["validate.py"]
            # the teacher: the row's dataset, written where every later stage reads it
            assert get_dataset_spec(sq["dataset"]).name == REGISTRY[key], path.name
            assert str(sq["out"]) == teacher and str(sq["data_path"]) == data, path.name
            if key == "in1k":
                assert str(sq["weights"]) == env["WEIGHTS"] and canonical_name(sq["arch"]) == "ResNet-18"
            else:
                assert sq["weights"] is None and sq["recipe"] in squeeze.RECIPES, path.name
            # synthesis: the row's method and IPC, from the teacher (and the init folder)
            assert rec["preset"] in recover.PRESETS, (path.name, rec["preset"])
            assert recover.PRESETS[rec["preset"]]["method"] == method, path.name
            assert rec["ipc"] == ipc and str(rec["teacher_path"]) == teacher and str(rec["out"]) == f"{out}/syn"
            if method == "sre2l":
                assert rec["init_path"] is None
            else:
                rs = p["rank_select.py"]
                assert str(rs["teacher"]) == teacher and str(rs["data_path"]) == data and rs["ipc"] == ipc
                assert str(rs["out"]) == str(rec["init_path"]) == f"{out}/init", path.name
                assert rs["selection"] == {"dwa": "random", "delt": "medium"}[method], path.name
                assert rs["fmt"] == ("tensor" if method == "dwa" and key.startswith("cifar") else "folder")
            # validation: the KD protocol of the row, on the recovered set, beside a random real subset
            assert val["preset"] in validate.KD_PRESETS, (path.name, val["preset"])
            assert val["preset"].split("-")[0] == method, path.name
            assert str(val["syn"]) == f"{out}/syn" and str(val["teacher"]) == teacher, path.name
            assert str(val["data_path"]) == data and val["baseline"] == ["random"] and val["runs"] == 3
            assert canonical_name(val["model"]) in ("ResNet-18", "ResNet-18-modified"), path.name
            if "relabel.py" in p:
                assert str(p["relabel.py"]["syn"]) == f"{out}/syn"
                assert str(val["soft_labels"]) == str(p["relabel.py"]["out"]) == f"{out}/labels"
            else:
                assert val["soft_labels"] is None
            if key == "imagenette":   # DELT's 224-px ImageNette: the teacher and the evaluation agree
                assert sq["res"] == val["res"] == 224


def test_steps_select_and_skip_work(tmp_path, stub):
    log = tmp_path / "calls.jsonl"
    env = row_env(tmp_path, stub)
    script = DEC / "delt_cifar10_ipc10.sh"
    r, calls = run([script], {**env, "STEPS": "recover"}, log)
    assert r.returncode == 0 and [c["argv"][0] for c in calls] == ["recover.py"]
    r, calls = run([script], {**env, "STEPS": "teacher bogus"}, log)
    assert r.returncode == 2 and not calls
    assert r.stderr.strip().count("\n") == 0 and "unknown step 'bogus'" in r.stderr
    # a second run skips the teacher and the init once their files exist
    Path(env["TEACHER"]).write_bytes(b"t")
    (Path(env["OUT"]) / "init").mkdir(parents=True)
    (Path(env["OUT"]) / "init" / "selection.json").write_text("{}")
    r, calls = run([script], env, log)
    assert r.returncode == 0 and [c["argv"][0] for c in calls] == ["recover.py", "validate.py"]
    r, calls = run([DEC / "sre2l_in1k_ipc10.sh"], {**env, "LABELS": "maybe"}, log)
    assert r.returncode == 2 and not calls and "LABELS must be stored" in r.stderr


def test_imagenet_synthesis_fails_early_with_one_line(tmp_path, stub):
    log = tmp_path / "calls.jsonl"
    empty = tmp_path / "empty imagenet"
    empty.mkdir()
    env = {"PYTHON": str(stub), "DATA": str(empty), "OUT": str(tmp_path / "out"), "TEACHER": str(tmp_path / "t.pt"),
           "WEIGHTS": str(tmp_path / "w.pth")}
    r, calls = run([SYNTH], env, log)
    assert r.returncode == 2 and not calls and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and str(empty) in r.stderr
    # an ImageNet layout but no weights (and no teacher yet): the weights are named
    (empty / "train" / "n01440764").mkdir(parents=True)
    (empty / "val").mkdir()
    r, calls = run([SYNTH], env, log)
    assert r.returncode == 2 and not calls and r.stderr.count("\n") == 1 and "w.pth" in r.stderr
    r, calls = run([SYNTH], {**env, "IPC": "ten"}, log)
    assert r.returncode == 2 and not calls and "IPC must be a positive integer" in r.stderr


def test_imagenet_synthesis_follows_delt_script(tmp_path, stub):
    log = tmp_path / "calls.jsonl"
    data = tmp_path / "image net"
    (data / "train" / "n01440764").mkdir(parents=True)
    (data / "val").mkdir()
    weights = tmp_path / "resnet18-f37072fd.pth"
    weights.write_bytes(b"w")
    out = tmp_path / "out dir"
    env = {"PYTHON": str(stub), "DATA": str(data), "OUT": str(out), "TEACHER": str(tmp_path / "t t.pt"),
           "WEIGHTS": str(weights)}
    for ipc in (50, 10):
        r, calls = run([SYNTH], {**env, "IPC": str(ipc)}, log)
        assert r.returncode == 0, r.stderr
        p = dict(parse(c["argv"]) for c in calls)
        assert list(p) == ["squeeze.py", "rank_select.py", "recover.py"]
        assert str(p["squeeze.py"]["weights"]) == str(weights) and p["squeeze.py"]["dataset"] == "ImageNet"
        rs, rec = p["rank_select.py"], p["recover.py"]
        # DELT ranks once at IPC 50; IPC 10 takes the first 10 (closest to the median) files of that folder
        assert rs["selection"] == "medium" and rs["ipc"] == 50 and str(rs["data_path"]) == str(data)
        assert rec["preset"] == "delt-in1k" and rec["ipc"] == ipc
        assert str(rec["init_path"]) == str(rs["out"]) == f"{out}/medium_ipc50"
        assert str(rec["out"]) == f"{out}/IPC{ipc}_4K_500_medium"


def test_imagenet_validation_runs_delt_seeds_and_summarises(tmp_path, stub):
    log = tmp_path / "calls.jsonl"
    out = tmp_path / "out dir"
    syn = out / "IPC50_4K_500_medium"
    syn.mkdir(parents=True)
    (syn / "meta.json").write_text("{}")
    (tmp_path / "data" / "val").mkdir(parents=True)
    teacher = tmp_path / "t.pt"
    teacher.write_bytes(b"t")
    env = {"PYTHON": str(stub), "DATA": str(tmp_path / "data"), "OUT": str(out), "TEACHER": str(teacher),
           "FAKE_RESULTS": "1"}
    r, calls = run([VALID], env, log)
    assert r.returncode == 0, r.stderr
    vals = [parse(c["argv"])[1] for c in calls if c["argv"][0] == "validate.py"]
    assert [v["seed"] for v in vals] == [3407, 4663, 2897]
    for v in vals:
        assert v["preset"] == "delt" and v["runs"] == 1 and v["baseline"] == ["random"] and v["ipc"] == 50
        assert str(v["syn"]) == str(syn) and str(v["teacher"]) == str(teacher)
    assert len({str(v["results"]) for v in vals}) == 3
    # the summary: mean and population std over the three seeds, per arm
    accs = [s / 10000 for s in (3407, 4663, 2897)]
    mean = sum(accs) / 3
    std = (sum((a - mean) ** 2 for a in accs) / 3) ** 0.5
    line = next(x for x in r.stdout.splitlines() if x.startswith("syn"))
    assert f"{100 * mean:6.2f} ± {100 * std:.2f} %" in line and "3 seeds" in line
    assert any(x.startswith("random") for x in r.stdout.splitlines())
    r, calls = run([VALID], {**env, "IPC": "10"}, log)
    assert r.returncode == 2 and not calls and "IPC10_4K_500_medium" in r.stderr


def test_recover_array_hands_each_task_its_shard(tmp_path, stub):
    log = tmp_path / "calls.jsonl"
    args = ["--preset", "sre2l-in1k", "--teacher", "t t.pt", "--ipc", "50", "--out", "syn dir"]
    slurm = {"SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4",
             "SLURM_ARRAY_TASK_COUNT": "3"}
    r, calls = run([ARRAY, *args], {"PYTHON": str(stub), **slurm}, log)
    assert r.returncode == 0, r.stderr
    (call,) = calls
    stage, opt = parse(call["argv"])
    assert stage == "recover.py" and opt["shard_index"] == 1 and opt["num_shards"] == 3
    assert opt["preset"] == "sre2l-in1k" and str(opt["teacher_path"]) == "t t.pt" and str(opt["out"]) == "syn dir"
    # a row script: only its recover step, one process (LAUNCH cleared), recover.py reading the same shard itself
    env = {**row_env(tmp_path, stub), **slurm, "LAUNCH": "torchrun --nproc_per_node 8"}
    r, calls = run([ARRAY, DEC / "dwa_tiny_ipc50.sh"], env, log)
    assert r.returncode == 0, r.stderr
    (call,) = calls
    assert call["argv"][0] == "recover.py" and call["env"]["LAUNCH"] is None
    assert "--shard-index" not in call["argv"]
    old = {k: os.environ.get(k) for k in slurm}
    try:
        os.environ.update({k: v for k, v in call["env"].items() if k.startswith("SLURM") and v is not None})
        assert resolve_shard(None, None, DistInfo()) == (1, 3)
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    # outside an array, or a task outside 0..N-1: one-line refusal, nothing started
    r, calls = run([ARRAY, *args], {"PYTHON": str(stub)}, log)
    assert r.returncode == 2 and not calls and "not an array task" in r.stderr
    r, calls = run([ARRAY, *args], {"PYTHON": str(stub), **slurm, "SLURM_ARRAY_TASK_MIN": "0"}, log)
    assert r.returncode == 2 and not calls and "contiguous" in r.stderr


def test_torchrun_sbatch_uses_the_jobs_gpus(tmp_path, stub):
    log = tmp_path / "calls.jsonl"
    base = {"TORCHRUN": str(stub), "CUDA_VISIBLE_DEVICES": "0,1,2"}
    r, calls = run([TORCHRUN, "validate.py", "--syn", "a b", "--preset", "delt"], base, log)
    assert r.returncode == 0, r.stderr
    (call,) = calls
    assert call["argv"][:3] == ["--standalone", "--nproc_per_node", "3"]
    assert parse(call["argv"][3:])[1]["syn"] == Path("a b")
    r, calls = run([TORCHRUN, "squeeze.py", "--epochs", "1"], {**base, "SLURM_GPUS_ON_NODE": "4"}, log)
    assert r.returncode == 0 and calls[0]["argv"][:4] == ["--standalone", "--nproc_per_node", "4", "squeeze.py"]
    r, calls = run([TORCHRUN, "rank_select.py", "--ipc", "1"], base, log)
    assert r.returncode == 2 and not calls and "one process" in r.stderr
    # a row script: the multi-GPU stages go through torchrun, rank_select.py stays one process
    env = {**row_env(tmp_path, stub), **base}
    r, calls = run([TORCHRUN, DEC / "delt_tiny_ipc10.sh"], env, log)
    assert r.returncode == 0, r.stderr
    launched = {c["argv"][3]: c["argv"][:3] for c in calls if c["argv"][0] == "--standalone"}
    assert set(launched) == {"squeeze.py", "recover.py", "validate.py"}
    assert all(v == ["--standalone", "--nproc_per_node", "3"] for v in launched.values())
    assert [c["argv"][0] for c in calls if c["argv"][0] != "--standalone"] == ["rank_select.py"]
