"""utils/misc.py: seeds, device choice, the CSV log, and one-line CLI errors."""
import random

import numpy as np
import pytest
import torch

from utils.errors import UserError
from utils.misc import RunLog, cli_errors, resolve_device, seed_everything


def test_seed_everything_repeats_all_three_rngs():
    def draw():
        g = seed_everything(5)
        return random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item()
    assert draw() == draw()


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_runlog_csv_keeps_columns_aligned(tmp_path):
    log = RunLog(tmp_path / "log.csv", quiet=True)
    log.row(a=1, b=2)
    log.row(a=3, c=4)
    assert (tmp_path / "log.csv").read_text().splitlines() == ["a,b,c", "1,2,", "3,,4"]
    back = RunLog(tmp_path / "log.csv", quiet=True, constant={"k": "x"}, resume=True)
    assert back.find(a=3)["c"] == "4" and back.find(a=9) is None
    back.row(a=5)
    assert back.rows[-1] == {"a": 5, "k": "x"}


def test_cli_errors_turns_user_error_into_exit_2(capsys):
    @cli_errors
    def main():
        raise UserError("bad path /x")
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2 and capsys.readouterr().err == "error: bad path /x\n"
