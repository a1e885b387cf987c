"""utils/progress.py: a bar on a terminal, throttled plain lines elsewhere, silence on other ranks (fake clock)."""
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.progress import LineProgress, format_duration, progress, progress_mode, step

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    """Advances by `dt` seconds each time it is read."""

    def __init__(self, dt: float):
        self.t, self.dt = 1000.0, dt

    def __call__(self) -> float:
        self.t += self.dt
        return self.t


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _no_overrides(monkeypatch):
    monkeypatch.delenv("DDT_PROGRESS", raising=False)
    monkeypatch.delenv("RANK", raising=False)


def test_lines_at_most_every_interval_with_position_rate_and_eta():
    out = io.StringIO()
    clock = FakeClock(10.0)      # one read at the start, then one per item: 10 s per item
    items = list(progress(range(10), total=10, desc="epoch 1/3", stream=out, clock=clock))
    assert items == list(range(10))
    lines = out.getvalue().splitlines()
    # 10 s per item, a line once 30 s have passed since the last one: after items 3, 6 and 9, then the closing line
    assert lines == [
        "epoch 1/3: 3/10 (30%), 10 s/it, elapsed 0:30, ETA 1:10",
        "epoch 1/3: 6/10 (60%), 10 s/it, elapsed 1:00, ETA 0:40",
        "epoch 1/3: 9/10 (90%), 10 s/it, elapsed 1:30, ETA 0:10",
        "epoch 1/3: done, 10 in 1:50 (11 s/it)",  # the closing read of the clock adds one step
    ]
    assert "\r" not in out.getvalue()


def test_fast_loop_prints_nothing_and_rate_in_seconds_per_item_when_slow():
    out = io.StringIO()
    list(progress(range(100), total=100, desc="x", stream=out, clock=FakeClock(0.01)))
    assert out.getvalue() == ""  # 1 s in all: under the interval, no line
    list(progress(range(320), total=320, desc="fast", stream=out, clock=FakeClock(0.125)))
    assert out.getvalue().splitlines()[0] == "fast: 240/320 (75%), 8 it/s, elapsed 0:30, ETA 0:10"
    out = io.StringIO()
    slow = LineProgress(range(2), total=2, desc="decode", stream=out, clock=FakeClock(40.0))
    list(slow)
    assert out.getvalue().splitlines()[0] == "decode: 1/2 (50%), 40 s/it, elapsed 0:40, ETA 0:40"


def test_unknown_total_reports_count_without_eta():
    out = io.StringIO()
    list(progress(iter(range(4)), desc="files", stream=out, clock=FakeClock(30.0)))
    assert out.getvalue().splitlines()[0] == "files: 1, 30 s/it, elapsed 0:30"


def test_terminal_gets_a_bar_and_other_ranks_and_quiet_get_nothing(monkeypatch):
    from tqdm import tqdm
    assert isinstance(progress(range(3), stream=Tty()), tqdm)
    assert isinstance(progress(range(3), stream=io.StringIO()), LineProgress)
    r = range(3)
    assert progress(r, disable=True, stream=Tty()) is r
    monkeypatch.setenv("RANK", "1")
    assert progress_mode(Tty()) == "off" and progress(r, stream=io.StringIO()) is r
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("DDT_PROGRESS", "lines")
    assert progress_mode(Tty()) == "lines"
    monkeypatch.setenv("DDT_PROGRESS", "0")
    assert progress_mode(Tty()) == "off"


def test_step_announces_and_reports_long_durations_only(monkeypatch):
    out = io.StringIO()
    with step("fitting ZCA on 50000 train images", stream=out, clock=FakeClock(75.0)):
        pass
    assert out.getvalue().splitlines() == ["fitting ZCA on 50000 train images ...",
                                           "fitting ZCA on 50000 train images: done in 1:15"]
    out = io.StringIO()
    with step("quick", stream=out, clock=FakeClock(0.1)):
        pass
    assert out.getvalue() == "quick ...\n"
    out = io.StringIO()
    with step("quiet", quiet=True, stream=out, clock=FakeClock(75.0)):
        pass
    monkeypatch.setenv("RANK", "3")
    with step("rank 3", stream=out, clock=FakeClock(75.0)):
        pass
    assert out.getvalue() == ""


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.4, 61, 3600, 3725)] == ["0:00", "0:59", "1:01", "1:00:00", "1:02:05"]


def test_cache_build_announces_itself_with_place_and_size(tmp_path, capsys):
    """A file-tree split decoded for the first time says so, then prints the cache file and its size."""
    from PIL import Image
    from utils.datasets import load_split
    for split in ("train", "test"):
        for c in ("a", "b"):
            d = tmp_path / "tree" / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(d / f"{i}.png")
    cache = tmp_path / "cache"
    load_split("ImageFolder", tmp_path / "tree", "test", cache_dir=cache)
    err = capsys.readouterr().err
    files = list(cache.glob("*.pt"))
    assert len(files) == 1
    assert f"ImageFolder test: decoding 6 images once, to be cached in {cache}" in err
    size = files[0].stat().st_size
    assert f"cached {files[0]} ({size / 1000:.1f} KB)" in err
    load_split("ImageFolder", tmp_path / "tree", "test", cache_dir=cache)  # from the cache: nothing to announce
    assert capsys.readouterr().err == ""


def test_stage_under_a_pipe_writes_no_carriage_return(tmp_path):
    """Loading a split with stderr going to a file (nohup, Slurm): the step is announced in plain lines, no
    carriage return (a bar would write one)."""
    from PIL import Image
    for split in ("train", "test"):
        for c in ("a", "b"):
            d = tmp_path / "tree" / split / c
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(d / f"{i}.png")
    code = ("import sys; sys.path.insert(0, %r); from utils.datasets import load_split; "
            "load_split('ImageFolder', %r, 'train', cache_dir=%r)") % (str(ROOT), str(tmp_path / "tree"),
                                                                       str(tmp_path / "c"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "decoding 4 images once" in r.stderr
    assert torch.load(next((tmp_path / "c").glob("*.pt")), weights_only=True)["images"].shape == (4, 3, 8, 8)


def test_dream_kmeans_initialisation_announces_itself(tmp_path):
    """condense.py --dream clusters every class before its first iteration: that step says so on stderr."""
    from typer.testing import CliRunner
    import condense
    from tests.test_validate import make_mnist_like
    (tmp_path / "data").mkdir()
    make_mnist_like(tmp_path / "data")
    args = ["-d", "MNIST", "--data-path", str(tmp_path / "data"), "--ipc", "1", "-f", "1", "--train-subset", "5",
            "--outer-iterations", "1", "--inner-loop", "1", "--n-data", "20", "--batch-real", "4", "--net",
            "ConvNet-1-w8", "--out"]
    r = CliRunner().invoke(condense.app, [*args, str(tmp_path / "dream"), "--dream", "--init", "kmean"])
    assert r.exit_code == 0, r.output
    assert "clustering each class's embeddings (k-means) for the 10 initial images ..." in r.output
    r = CliRunner().invoke(condense.app, [*args, str(tmp_path / "idc")])   # IDC's real init clusters nothing
    assert r.exit_code == 0 and "clustering" not in r.output
