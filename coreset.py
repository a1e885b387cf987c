"""coreset.py: write a real-image subset (IPC images per class) as a synthetic set.

    python coreset.py --dataset FashionMNIST --ipc 10 --seed 0 --out runs/fmnist_random_ipc10

The set is stored in pixel space with the `pixels` decoder, so `validate.py --syn` reads it like any distilled
set; this is the harness check (a random subset must score like `--baseline random`) and the reference point
every method is compared against. `--method herding` picks, per class, the images whose mean feature (of a
network trained for `--herding-epochs` on the train split) herds toward the class mean (idc_dream.md §5 item 10).

Selectors are `fn(labels, num_classes, ipc, seed, **context) -> class-major indices`; the context (images, spec,
device, herding options) is passed to every selector, and those that do not need it ignore it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import typer

from utils.coreset import herding_indices
from utils.datasets import load_split, per_class_indices, to_pixels
from utils.errors import UserError
from utils.io import check_writable, refuse_overlap, run_lock
from utils.misc import require_at_least, cli_errors, resolve_device
from utils.synset import pixel_set, save_synset

SELECTORS = {}


def selector(name: str):
    def wrap(fn):
        SELECTORS[name] = fn
        return fn
    return wrap


@selector("random")
def select_random(labels: torch.Tensor, num_classes: int, ipc: int, seed: int, **_) -> torch.Tensor:
    """`ipc` uniformly random images per class (seeded), class-major."""
    return per_class_indices(labels, num_classes, ipc, seed)


@selector("first")
def select_first(labels: torch.Tensor, num_classes: int, ipc: int, seed: int, **_) -> torch.Tensor:
    """The first `ipc` images of each class in dataset order (what IDC's `-s random` actually does)."""
    out = []
    for c in range(num_classes):
        pool = torch.nonzero(labels == c).flatten()
        if len(pool) < ipc:
            raise UserError(f"class {c} has {len(pool)} images; IPC {ipc} is larger than what is available")
        out.append(pool[:ipc])
    return torch.cat(out)


@selector("herding")
def select_herding(labels: torch.Tensor, num_classes: int, ipc: int, seed: int, *, images: torch.Tensor, spec,
                   herding_model: str = "ConvNet-3", herding_epochs: int = 5,
                   device: torch.device = torch.device("cpu"), **_) -> torch.Tensor:
    """Herding on the features of a network trained for `herding_epochs` from `seed` (idc_dream.md §5 item 10)."""
    return herding_indices(images, labels, spec, ipc, model=herding_model, epochs=herding_epochs, seed=seed,
                           device=device)


app = typer.Typer(add_completion=False, context_settings={"help_option_names": ["-h", "--help"]})


@app.command()
@cli_errors
def main(
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset name, e.g. FashionMNIST, CIFAR10."),
    data_path: Path = typer.Option(Path("data"), "--data-path", "--data_path", help="Raw dataset folder."),
    ipc: int = typer.Option(..., "--ipc", help="Images per class."),
    method: str = typer.Option("random", "--method", "-s", help=f"Selection rule: {', '.join(SELECTORS)}."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random selection (herding: of the feature network)."),
    out: Path = typer.Option(..., "--out", help="Output synthetic-set directory."),
    res: Optional[int] = typer.Option(None, "--res", help="Override the dataset resolution."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    export: bool = typer.Option(False, "--export-imagefolder", help="Also write the images as PNG class folders."),
    herding_model: str = typer.Option("ConvNet-3", "--herding-model", "--herding_model", help="herding: network "
                                      "trained on the train split whose embed() features are herded."),
    herding_epochs: int = typer.Option(5, "--herding-epochs", "--herding_epochs", help="herding: epochs of that "
                                       "network (SGD lr 0.01, batch 256, no augmentation)."),
    device: str = typer.Option("auto", "--device", help="herding: where the feature network trains (auto, cpu, "
                               "cuda)."),
):
    """Select IPC real images per class and save them as a synthetic set (with grid.png)."""
    if method not in SELECTORS:
        raise UserError(f"unknown --method '{method}' ({', '.join(SELECTORS)})")
    require_at_least({"--ipc": ipc, "--res": res})
    check_writable(out, "--out")
    refuse_overlap(out, "--out", {"--data-path": data_path})
    # one writer per set: a second job on the same --out stops instead of replacing the first one's set (the lock
    # sits beside the set, which is replaced whole)
    with run_lock(out.parent, "coreset.py", f".{out.name}.lock"):
        write_coreset(dataset, data_path, ipc, method, seed, out, res, overwrite, export, herding_model,
                      herding_epochs, device)


def write_coreset(dataset: str, data_path: Path, ipc: int, method: str, seed: int, out: Path, res: Optional[int],
                  overwrite: bool, export: bool, herding_model: str, herding_epochs: int, device: str) -> None:
    """Select the subset and write it as a synthetic set (the stage without its lock)."""
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    data, spec = load_split(dataset, data_path, "train", resolution=res)
    dev = resolve_device(device) if method == "herding" else torch.device("cpu")
    idx = SELECTORS[method](data.labels, spec.num_classes, ipc, seed, images=data.images, spec=spec,
                            herding_model=herding_model, herding_epochs=herding_epochs, device=dev)
    args = {"ipc": ipc, "method": method, "seed": seed}
    if method == "herding":
        args.update(herding_model=herding_model, herding_epochs=herding_epochs)
    syn = pixel_set(to_pixels(data.images[idx]), data.labels[idx], spec, method=f"coreset-{method}",
                    args=args, seed=seed)
    save_synset(syn, out)
    if export:
        from utils.synset import export_imagefolder
        export_imagefolder(syn, out / "images")
    print(f"wrote {len(idx)} images ({ipc} per class) to {out}")


if __name__ == "__main__":
    app()
