"""Run a piece of a paper's ORIGINAL implementation on this CPU, from a checkout the user gives, and return tensors.

The originals (IDC, DREAM, MTT, SPEED, SRe2L, DWA, DELT) assume CUDA and ship top-level modules named `utils`,
`data`, `train`, `networks`, ... that would collide with this toolkit's packages. So each call runs in a fresh
subprocess whose import path is the original checkout only (plus the adapter file), with CUDA redirected to the
CPU in-process: nothing in the checkout is edited, and nothing of the original enters this repository.

    from original_runner import run_original
    out = run_original(original_dir, "bench/original_side/idc.py", "decode", {"images": x, ...})

The adapter is a file of this repository that imports ONLY torch/numpy and the original's own modules; its
function `fn(root: Path, payload: dict) -> dict` receives the payload (tensors, numbers, strings, lists) and
returns a dict of the same kinds. Payload and result travel as `torch.save` files (read back with weights_only).

Redirections (`patch_cuda_to_cpu`), each because an original relies on it:
- `torch.cuda.is_available()` False, `device_count()` 1 (SPEED expands parameters per GPU), seeding/sync/cache no-ops;
- `Tensor.cuda()` / `Module.cuda()` return the object itself (as on a GPU, where the data already lives there);
- a `device='cuda...'` argument of the tensor factories, `Tensor.to`, `Module.to` becomes the CPU;
- `Tensor.cpu()` of a CPU tensor returns a COPY when `copy_on_cpu` is set: on a GPU `.cpu()` always copies, and
  SPEED's buffer.py snapshots weights with it (on CPU it would alias, so every snapshot would equal the final
  weights). Off by default, because the copy costs time in speed comparisons.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

_FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "rand", "randn", "randint", "randperm",
              "arange", "linspace", "eye", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like",
              "randn_like", "randint_like", "normal")


class OriginalFailed(RuntimeError):
    """The original's code raised, or its checkout is not what the adapter expects."""


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


def _cpu_device_kwargs(kwargs: dict) -> dict:
    if "device" in kwargs and _is_cuda(kwargs["device"]):
        kwargs = dict(kwargs, device="cpu")
    return kwargs


def _redirect_device(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **_cpu_device_kwargs(kwargs))
    return wrapper


def _redirect_to(fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        args = tuple("cpu" if _is_cuda(a) else a for a in args)
        return fn(self, *args, **_cpu_device_kwargs(kwargs))
    return wrapper


def patch_cuda_to_cpu(copy_on_cpu: bool = False) -> None:
    """Make CUDA-only code run on the CPU in this process (see the module docstring for each redirection)."""
    cuda = torch.cuda
    cuda.is_available = lambda: False
    cuda.device_count = lambda: 1
    cuda.current_device = lambda: 0
    for name in ("manual_seed", "manual_seed_all", "synchronize", "empty_cache", "reset_peak_memory_stats",
                 "set_device"):
        setattr(cuda, name, lambda *a, **k: None)
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_allocated = lambda *a, **k: 0
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.to = _redirect_to(torch.Tensor.to)
    torch.nn.Module.to = _redirect_to(torch.nn.Module.to)
    for name in _FACTORIES:
        setattr(torch, name, _redirect_device(getattr(torch, name)))
    if copy_on_cpu:
        original_cpu = torch.Tensor.cpu
        torch.Tensor.cpu = lambda self, *a, **k: (self.clone() if self.device.type == "cpu"
                                                  else original_cpu(self, *a, **k))


def original_commit(root: Path) -> str:
    """The checkout's commit (reported beside every parity line), or 'unknown' when it is not a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=30)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_original(root: Path, marker: str) -> Path:
    """The checkout path, refused with one line when it does not hold the file that identifies the original."""
    root = Path(root).expanduser().resolve()
    if not (root / marker).is_file():
        raise OriginalFailed(f"--original {root}: no {marker} there; pass a checkout of the original repository")
    return root


def run_original(root: Path, adapter: str | Path, fn: str, payload: dict, *, threads: int = 1,
                 copy_on_cpu: bool = False, extra_paths: tuple[str, ...] = (), timeout: float = 3600) -> dict:
    """Run `fn` of `adapter` in a fresh subprocess over the original checkout at `root`; return its result dict.

    `extra_paths` are folders inside the checkout to put on the import path after its root (e.g. DWA's
    `distillation/`); the subprocess works in the checkout's root folder, as the originals' scripts expect.
    """
    root = Path(root).resolve()
    adapter = Path(adapter)
    if not adapter.is_absolute():
        adapter = Path(__file__).resolve().parent.parent / adapter
    with tempfile.TemporaryDirectory(prefix="ddt-original-") as tmp:
        src, dst = Path(tmp) / "payload.pt", Path(tmp) / "result.pt"
        torch.save(payload, src)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--original", str(root), "--adapter", str(adapter),
               "--fn", fn, "--payload", str(src), "--result", str(dst), "--threads", str(threads)]
        for p in extra_paths:
            cmd += ["--extra-path", p]
        if copy_on_cpu:
            cmd.append("--copy-on-cpu")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise OriginalFailed(f"the original ({root.name}, {adapter.name}:{fn}) failed:\n{tail}")
        return torch.load(dst, weights_only=True)


def _worker(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="internal: runs one adapter function over an original checkout")
    p.add_argument("--original", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--fn", required=True)
    p.add_argument("--payload", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--extra-path", action="append", default=[])
    p.add_argument("--copy-on-cpu", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    patch_cuda_to_cpu(copy_on_cpu=a.copy_on_cpu)
    root = Path(a.original)
    # Only the original is importable: this repository's own folder must not shadow its `utils`, `data`, ...
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [str(root)] + [str(root / e) for e in a.extra_path] + [q for q in sys.path if q not in ("", here)]
    spec = importlib.util.spec_from_file_location("ddt_original_adapter", a.adapter)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    payload = torch.load(a.payload, weights_only=True)
    result = getattr(module, a.fn)(root, payload)
    torch.save(result, a.result)


if __name__ == "__main__":
    _worker()
