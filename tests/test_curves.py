"""Learning curves: --eval-every in condense.py and distill.py (logged, and the set unchanged by it),
--tensorboard, and scripts/plot_log.py."""
import csv
import importlib.util
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import condense
from tests.test_distill import _distill, _tensors, experts  # noqa: F401  (experts: a module fixture)
from tests.test_validate import make_mnist_like

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def eval_rows(path):
    return [(int(r["it"]), float(r["eval_acc"])) for r in rows(path) if r.get("eval_acc")]


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    make_mnist_like(root)
    return root


def _condense(data, out, *extra):
    return runner.invoke(condense.app, ["-d", "MNIST", "--data-path", str(data), "--ipc", "1", "-f", "1",
                                        "--train-subset", "5", "--outer-iterations", "3", "--inner-loop", "1",
                                        "--n-data", "20", "--batch-real", "4", "--net", "ConvNet-1-w8", "--out",
                                        str(out), "--quiet", *extra])


def test_condense_eval_every_logs_test_accuracy_and_leaves_the_set_unchanged(mnist, tmp_path):
    plain, curved = tmp_path / "plain", tmp_path / "curved"
    assert _condense(mnist, plain).exit_code == 0
    r = _condense(mnist, curved, "--eval-every", "2", "--eval-epochs", "2")
    assert r.exit_code == 0, r.output
    evals = eval_rows(curved / "log.csv")
    assert [it for it, _ in evals] == [2, 3]          # every 2 outer iterations, and after the last
    assert all(0.0 <= acc <= 1.0 for _, acc in evals)
    assert [r["eval_epochs"] for r in rows(curved / "log.csv") if r.get("eval_acc")] == ["2", "2"]
    a = torch.load(plain / "synset.pt", weights_only=True)["tensors"]["images"]
    b = torch.load(curved / "synset.pt", weights_only=True)["tensors"]["images"]
    assert torch.equal(a, b)                          # the evaluation draws nothing from the run's random states


def test_distill_eval_every_logs_test_accuracy_and_leaves_the_set_unchanged(experts, tmp_path):  # noqa: F811
    plain, curved = tmp_path / "plain", tmp_path / "curved"
    assert _distill(experts, plain).exit_code == 0
    r = _distill(experts, curved, "--eval-every", "2", "--eval-epochs", "1")
    assert r.exit_code == 0, r.output
    evals = eval_rows(curved / "log.csv")
    assert [it for it, _ in evals] == [1, 3]          # distill's log counts iterations from 0: after 2 and 4
    assert all(0.0 <= acc <= 1.0 for _, acc in evals)
    a, b = _tensors(plain), _tensors(curved)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_eval_options_are_one_line_errors(mnist, tmp_path):
    r = _condense(mnist, tmp_path / "x", "--eval-every", "-1")
    assert r.exit_code == 2 and "error: --eval-every must be >= 0 (0: no evaluation), got -1" in r.output
    r = _condense(mnist, tmp_path / "y", "--eval-every", "1", "--eval-epochs", "0")
    assert r.exit_code == 2 and "error: --eval-epochs must be >= 1, got 0" in r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_tensorboard_writes_events_or_names_the_missing_package(mnist, tmp_path):
    tb = tmp_path / "tb"
    r = _condense(mnist, tmp_path / "run", "--eval-every", "3", "--eval-epochs", "1", "--tensorboard", str(tb))
    if importlib.util.find_spec("tensorboard") is None:   # an optional dependency
        assert r.exit_code == 2, r.output
        assert "error: --tensorboard needs the optional tensorboard package: pip install tensorboard" in r.output
    else:
        assert r.exit_code == 0, r.output
        assert list(tb.glob("events.out.tfevents.*"))


def _plot_log():
    spec = importlib.util.spec_from_file_location("plot_log", ROOT / "scripts" / "plot_log.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plot_log_draws_one_panel_per_numeric_column(tmp_path, capsys):
    from PIL import Image
    plot = _plot_log()
    log = tmp_path / "log.csv"
    log.write_text("it,match_loss,seconds,eval_acc,eval_epochs\n1,5.0,0.1,,\n2,4.0,0.1,,\n2,,,0.31,50\n"
                   "3,3.5,0.1,,\n4,3.0,0.1,,\n4,,,0.42,50\n")
    x_name, curves = plot.read_curves(log)
    assert x_name == "it" and list(curves) == ["match_loss", "eval_acc"]   # seconds / eval_epochs left out
    assert curves["eval_acc"] == [(2.0, 0.31), (4.0, 0.42)] and len(curves["match_loss"]) == 4
    assert plot.main([str(log)]) == 0
    img = Image.open(tmp_path / "log.png").convert("RGB")
    assert img.size == (plot.PANEL_W + 2 * plot.MARGIN, 2 * (plot.PANEL_H + plot.MARGIN) + plot.MARGIN)
    colours = {c for _, c in img.getcolors(maxcolors=1 << 20)}
    assert plot.COLOURS[0] in colours and plot.COLOURS[1] in colours   # both curves are drawn
    capsys.readouterr()
    assert plot.main([str(log), "--columns", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has no column nope" in err and err.count("\n") == 1
    assert plot.main([str(tmp_path / "missing.csv")]) == 2
    assert "error: cannot read" in capsys.readouterr().err
