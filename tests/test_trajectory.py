"""utils/trajectory.py: MTT's buffer file layout and the expert order of speed.md §3.5."""
from pathlib import Path

import pytest
import torch

from utils.errors import UserError
from utils.trajectory import (ExpertStream, buffer_files, expert_dir, expert_dir_for, flatten_snapshot,
                              load_buffer_file, num_snapshots, save_buffer_file)


def make_trajectory(tag: int, snapshots: int = 3) -> list:
    """A tiny trajectory whose every tensor carries its expert tag, so tests can tell experts apart."""
    return [[torch.full((2, 3), float(tag)) + e, torch.full((3,), float(tag)) - e] for e in range(snapshots)]


def tag_of(traj) -> int:
    return int(traj[0][0][0, 0])


def write_buffers(folder: Path, sizes: list[int]) -> list[Path]:
    """Files replay_buffer_0.. holding experts tagged 0, 1, 2, ... in order."""
    tag, paths = 0, []
    for n, size in enumerate(sizes):
        save_buffer_file([make_trajectory(tag + k) for k in range(size)], folder / f"replay_buffer_{n}.pt")
        tag += size
        paths.append(folder / f"replay_buffer_{n}.pt")
    return paths


def test_round_trip_keeps_structure_and_values(tmp_path):
    trajs = [make_trajectory(1), make_trajectory(2)]
    save_buffer_file(trajs, tmp_path / "replay_buffer_0.pt")
    back = load_buffer_file(tmp_path / "replay_buffer_0.pt")
    assert isinstance(back, list) and len(back) == 2
    for a, b in zip(trajs, back):
        assert isinstance(b, list) and num_snapshots(b) == 3
        for sa, sb in zip(a, b):
            assert isinstance(sb, list) and len(sb) == 2
            assert all(torch.equal(x, y) and y.dtype == torch.float32 for x, y in zip(sa, sb))
    # the file is MTT's plain structure: a plain torch.load sees lists of lists of lists of tensors
    raw = torch.load(tmp_path / "replay_buffer_0.pt", weights_only=True)
    assert type(raw) is list and type(raw[0]) is list and type(raw[0][0]) is list
    assert isinstance(raw[0][0][0], torch.Tensor)


def test_views_are_saved_without_their_base_storage(tmp_path):
    big = torch.zeros(1000, 1000)
    save_buffer_file([[[big[0, :4]]]], tmp_path / "replay_buffer_0.pt")
    assert (tmp_path / "replay_buffer_0.pt").stat().st_size < 100_000
    assert torch.equal(load_buffer_file(tmp_path / "replay_buffer_0.pt")[0][0][0], torch.zeros(4))


def test_flatten_snapshot_concatenates_in_order():
    snap = [torch.arange(6.0).reshape(2, 3), torch.tensor([7.0, 8.0])]
    flat = flatten_snapshot(snap)
    assert flat.shape == (8,) and flat.dtype == torch.float32
    assert flat.tolist() == [0, 1, 2, 3, 4, 5, 7, 8]


@pytest.mark.parametrize("args,expected", [
    (("buffers", "CIFAR10", "ConvNet", True), "buffers/CIFAR10/ConvNet"),
    (("buffers", "CIFAR10", "ConvNet", False), "buffers/CIFAR10_NO_ZCA/ConvNet"),
    (("buffers", "CIFAR100", "ConvNet", False), "buffers/CIFAR100_NO_ZCA/ConvNet"),
    (("buffers", "ImageNet", "ConvNetD5", False, "imagenette", 128), "buffers/ImageNet/imagenette/128/ConvNetD5"),
    (("buffers", "Tiny", "ConvNetD4", False), "buffers/Tiny/ConvNetD4"),
    (("buffers", "FashionMNIST", "ConvNet", False), "buffers/FashionMNIST/ConvNet"),
    # registry names (spec.name) land in MTT's folders too
    (("buffers", "TinyImageNet", "ConvNetD4", False), "buffers/Tiny/ConvNetD4"),
    (("buffers", "imagenette", "ConvNetD5", False), "buffers/ImageNet/imagenette/128/ConvNetD5"),
])
def test_expert_dir_follows_mtt_layout(args, expected):
    assert expert_dir(*args) == Path(expected)


def test_expert_dir_for_registry_names():
    assert expert_dir_for("b", "TinyImageNet", "ConvNetD4", False) == Path("b/Tiny/ConvNetD4")
    assert expert_dir_for("b", "tiny", "ConvNetD4", False) == Path("b/Tiny/ConvNetD4")
    assert expert_dir_for("b", "imagenette", "ConvNetD5", False) == Path("b/ImageNet/imagenette/128/ConvNetD5")
    assert expert_dir_for("b", "imagewoof", "ConvNetD4", False, res=64) == Path("b/ImageNet/imagewoof/64/ConvNetD4")
    assert expert_dir_for("b", "cifar-10", "ConvNet", False) == Path("b/CIFAR10_NO_ZCA/ConvNet")


def test_buffer_files_sorted_numerically_and_errors(tmp_path):
    write_buffers(tmp_path, [1] * 12)
    (tmp_path / "partial.pt").write_bytes(b"x")
    names = [p.name for p in buffer_files(tmp_path)]
    assert names == [f"replay_buffer_{n}.pt" for n in range(12)]  # 10 after 9, not after 1
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (empty, tmp_path / "missing"):
        with pytest.raises(UserError, match="buffer.py") as e:
            buffer_files(folder)
        assert str(folder) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content", [b"not a torch file", None, "dict", "ragged"])
def test_corrupt_or_foreign_file_is_one_line_error(tmp_path, content):
    path = tmp_path / "replay_buffer_0.pt"
    if content is None:
        save_buffer_file([make_trajectory(0)], path)
        path.write_bytes(path.read_bytes()[:100])  # truncated
    elif content == "dict":
        torch.save({"a": torch.zeros(1)}, path)
    elif content == "ragged":
        torch.save([[[torch.zeros(1)], [torch.zeros(1), torch.zeros(1)]]], path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as e:
        load_buffer_file(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_stream_visits_every_expert_once_per_pass_one_file_at_a_time(tmp_path, monkeypatch):
    files = write_buffers(tmp_path, [3, 3, 2])  # 8 experts, a short last file
    import utils.trajectory as T
    loads = []
    real_load = T.load_buffer_file
    monkeypatch.setattr(T, "load_buffer_file", lambda p: loads.append(Path(p).name) or real_load(p))
    s = ExpertStream(files, torch.Generator().manual_seed(0))
    passes = [[tag_of(s.next()) for _ in range(8)] for _ in range(3)]
    file_of = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 2, 7: 2}
    for p in passes:
        assert sorted(p) == list(range(8))
        # the experts of one file come consecutively (a file is finished before the next is read)
        ids = [file_of[t] for t in p]
        assert sum(a != b for a, b in zip(ids, ids[1:])) == 2
    assert passes[0] != passes[1] or passes[1] != passes[2]  # reshuffled between passes
    assert len(loads) <= 9 and s.num_experts_seen == 24


def test_stream_same_seed_same_sequence_and_load_all(tmp_path):
    files = write_buffers(tmp_path, [2, 2, 2])

    def seq(seed, load_all=False, n=15):
        s = ExpertStream(files, torch.Generator().manual_seed(seed), load_all=load_all)
        return [tag_of(s.next()) for _ in range(n)]
    assert seq(3) == seq(3) and seq(3) != seq(4)
    drawn = seq(5, load_all=True, n=200)
    assert drawn == seq(5, load_all=True, n=200) and set(drawn) == set(range(6))


def test_stream_max_files_and_max_experts(tmp_path):
    files = write_buffers(tmp_path, [3, 3])
    s = ExpertStream(files, torch.Generator().manual_seed(0), max_files=1, max_experts=2)
    assert sorted(tag_of(s.next()) for _ in range(4)) == [0, 0, 1, 1]
    s = ExpertStream(files, torch.Generator().manual_seed(0), load_all=True, max_experts=4)
    assert set(tag_of(s.next()) for _ in range(100)) == {0, 1, 2, 3}


@pytest.mark.parametrize("stop", [0, 1, 2, 3, 7, 9])
def test_stream_resume_continues_the_same_sequence(tmp_path, stop):
    files = write_buffers(tmp_path, [3, 2, 3])
    gen = torch.Generator().manual_seed(11)
    full = ExpertStream(files, gen)
    expected = [tag_of(full.next()) for _ in range(20)]

    gen = torch.Generator().manual_seed(11)
    first = ExpertStream(files, gen)
    got = [tag_of(first.next()) for _ in range(stop)]
    state, gen_state = first.state_dict(), gen.get_state()
    assert all(isinstance(v, (int, list)) for v in state.values())
    del first

    gen2 = torch.Generator()
    gen2.set_state(gen_state)
    resumed = ExpertStream(files, gen2)
    resumed.load_state_dict(state)
    got += [tag_of(resumed.next()) for _ in range(20 - stop)]
    assert got == expected and resumed.num_experts_seen == 20


def test_stream_state_of_other_files_is_refused(tmp_path):
    files = write_buffers(tmp_path, [2, 2])
    s = ExpertStream(files, torch.Generator().manual_seed(0))
    s.next()
    other = ExpertStream(files[:1], torch.Generator())
    with pytest.raises(UserError, match="same buffer folder"):
        other.load_state_dict(s.state_dict())
