"""The one network registry: names -> builders, aliases, weight loading, evaluation pools.

Grammar of a canonical name (matched case-insensitively): `<Family>[-<depth>][-<token>...]`, e.g.
`ConvNet-3`, `ConvNet-4-BN-MP`, `ConvNet-3-w256`, `ResNetAP-10`, `ResNet-18-BN`, `ResNet-18-modified`,
`ResNet-50`, `VGG-11-BN`, `AlexNet`. Each family is one row of FAMILIES (data, not if/elif code):
its depths, its suffix tokens and the builder keyword arguments they set. The spellings of the original
repositories (`ConvNetD4`, `ConvNetBN`, `conv3in`, `resnet10apin`, `resnet18_modified`, ...) are
rewritten to canonical names by ALIASES before parsing.

Families: ConvNet (idc_dream.md 4.1, speed.md 2, decoupled.md 1.2), ResNetAP (idc_dream.md 4.2),
ResNet-D-BN/-IN (idc_dream.md 4.3), ResNet-D-modified and plain torchvision ResNet-D
(decoupled.md 1.2), and the DC/DSA/MTT small-image pool AlexNet / VGG / LeNet / MLP.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from networks import classic, convnet, resnet
from utils.errors import UserError


def _resnet_family(channels: int, num_classes: int, resolution: int, depth: int,
                   norm: str | None = None, modified: bool = False, layout: str | None = None) -> nn.Module:
    """`ResNet-D-BN` / `-IN` are IDC's strided ResNet; `-modified` and plain `ResNet-D` are torchvision."""
    if norm is not None:
        if modified:
            raise UserError("a ResNet name takes either a norm suffix (-BN/-IN) or -modified, not both")
        return resnet.resnet_strided(channels, num_classes, resolution, depth, norm, layout or "imagenet")
    if layout is not None:
        raise UserError("option 'layout' applies to ResNetAP-D and ResNet-D-BN/-IN, not torchvision ResNets")
    return resnet.torchvision_resnet(channels, num_classes, resolution, depth, modified)


@dataclass(frozen=True)
class Family:
    """One row of the registry.

    title:    canonical spelling of the name's head.
    build:    builder(channels, num_classes, resolution, [depth,] **options) -> nn.Module.
    depths:   allowed values of the `-<depth>` part; empty when the name has none.
    tokens:   suffix token (lower case) -> builder options it sets; listed in canonical order.
    defaults: option values that the canonical name leaves out (so `ConvNet-3-IN` is `ConvNet-3`).
    int_tokens: prefix -> option for numeric tokens such as `w256` (ConvNet width).
    listed:   names list_networks() reports (each is tested at every resolution).
    """

    title: str
    build: Callable[..., nn.Module]
    depths: tuple[int, ...] = ()
    tokens: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    defaults: Mapping[str, object] = field(default_factory=dict)
    int_tokens: Mapping[str, str] = field(default_factory=dict)
    listed: tuple[str, ...] = ()


_NORM_TOKENS = {"bn": {"norm": "batch"}, "in": {"norm": "instance"}, "ln": {"norm": "layer"},
                "gn": {"norm": "group"}, "nn": {"norm": "none"}}

FAMILIES: dict[str, Family] = {f.title.lower(): f for f in (
    Family(
        "ConvNet", convnet.ConvNet, depths=tuple(range(1, 9)),
        tokens={**_NORM_TOKENS,
                "mp": {"pool": "max"}, "ap": {"pool": "avg"}, "np": {"pool": "none"},
                "ar": {"act": "relu"}, "as": {"act": "sigmoid"}, "al": {"act": "leakyrelu"}},
        defaults={"norm": "instance", "pool": "avg", "act": "relu", "width": 128},
        int_tokens={"w": "width"},
        listed=tuple(f"ConvNet-{d}" for d in range(1, 9)),
    ),
    Family(
        "ResNetAP", resnet.resnet_ap, depths=(10, 18, 34, 50, 101, 152),
        tokens={k: _NORM_TOKENS[k] for k in ("bn", "in", "nn")},
        defaults={"norm": "instance"},
        listed=("ResNetAP-10", "ResNetAP-18", "ResNetAP-34", "ResNetAP-50", "ResNetAP-10-BN", "ResNetAP-18-BN"),
    ),
    Family(
        "ResNet", _resnet_family, depths=(10, 18, 34, 50, 101, 152),
        tokens={"bn": {"norm": "batch"}, "in": {"norm": "instance"}, "modified": {"modified": True}},
        listed=("ResNet-10-BN", "ResNet-18-BN", "ResNet-34-BN", "ResNet-50-BN", "ResNet-10-IN", "ResNet-18-IN",
                "ResNet-18-modified", "ResNet-34-modified", "ResNet-50-modified", "ResNet-101-modified",
                "ResNet-18", "ResNet-34", "ResNet-50", "ResNet-101"),
    ),
    Family(
        "VGG", classic.VGG, depths=tuple(sorted(classic.VGG_PLANS)),
        tokens={"bn": {"norm": "batch"}, "in": {"norm": "instance"}},
        defaults={"norm": "instance"},
        listed=("VGG-11", "VGG-11-BN", "VGG-13", "VGG-16", "VGG-19"),
    ),
    Family("AlexNet", classic.AlexNet, listed=("AlexNet",)),
    Family("LeNet", classic.LeNet, listed=("LeNet",)),
    Family("MLP", classic.MLP, listed=("MLP",)),
)}

# Spellings used by the original repositories -> canonical names. Keys are lower case.
ALIASES: dict[str, str] = {
    "convnet": "ConvNet-3",          # DC/MTT/SPEED `ConvNet`, IDC `--net_type convnet`
    "resnet18bn": "ResNet-18-BN",    # MTT's BatchNorm ResNet-18 (3x3 stem, no max-pool at <= 64 px)
}
# (pattern over the lower-cased name, rewrite). Tried in order after ALIASES.
ALIAS_PATTERNS: tuple[tuple[str, Callable[[re.Match], str]], ...] = (
    (r"convnetd(\d)", lambda m: f"ConvNet-{m[1]}"),                           # ConvNetD4
    (r"convnetw(\d+)", lambda m: f"ConvNet-3-w{m[1]}"),                       # ConvNetW256
    (r"convnet(bn|in|ln|gn|nn|mp|ap|np|ar|as|al)", lambda m: f"ConvNet-3-{m[1]}"),  # ConvNetBN
    (r"conv(\d)(in|bn|ln|gn|nn)", lambda m: f"ConvNet-{m[1]}-{m[2]}"),       # IDC tags conv3in, conv3bn
    (r"conv(\d)", lambda m: f"ConvNet-{m[1]}-BN"),                           # RDED/DELT conv3: BatchNorm
    (r"resnet(\d+)ap(in|bn|nn)?", lambda m: f"ResNetAP-{m[1]}-{m[2] or 'in'}"),  # IDC tag resnet10apin
    (r"resnet(\d+)_(bn|in)", lambda m: f"ResNet-{m[1]}-{m[2]}"),             # IDC resnet10_bn
    (r"resnet(\d+)_modified", lambda m: f"ResNet-{m[1]}-modified"),          # RDED/DELT/DWA
    (r"vgg(\d+)(bn)?", lambda m: f"VGG-{m[1]}" + ("-BN" if m[2] else "")),   # MTT VGG11, VGG11BN
)

# Cross-architecture evaluation pools for `validate.py --eval-mode X` (the DC/DSA/MTT modes).
# SAME stands for the network the set was made with; eval_pool() substitutes it.
SAME = "same"
EVAL_POOLS: dict[str, tuple[str, ...]] = {
    "S": (SAME,),
    "M": ("ConvNet-3", "AlexNet", "VGG-11", "ResNet-18-BN"),
    "W": ("ConvNet-3-w32", "ConvNet-3-w64", "ConvNet-3-w128", "ConvNet-3-w256"),
    "D": ("ConvNet-1", "ConvNet-2", "ConvNet-3", "ConvNet-4"),
    "A": ("ConvNet-3-AS", "ConvNet-3", "ConvNet-3-AL"),
    "P": ("ConvNet-3-NP", "ConvNet-3-MP", "ConvNet-3"),
    "N": ("ConvNet-3-NN", "ConvNet-3-BN", "ConvNet-3-LN", "ConvNet-3", "ConvNet-3-GN"),
}


@dataclass(frozen=True)
class ParsedName:
    """A resolved name: its family, depth (or None), and the builder options its suffixes set."""

    canonical: str
    family: Family
    depth: int | None
    options: dict[str, object]


def _grammar() -> str:
    """One-line summary of every valid name, for error messages."""
    parts = []
    for fam in FAMILIES.values():
        depth = f"-{{{','.join(map(str, fam.depths))}}}" if fam.depths else ""
        suffix = "".join(f"[-{t}]" for t in _token_spellings(fam))
        parts.append(f"{fam.title}{depth}{suffix}")
    return "; ".join(parts)


def _token_spellings(fam: Family) -> list[str]:
    spellings = [t if t == "modified" else t.upper() for t in fam.tokens]
    return spellings + [f"{p}<int>" for p in fam.int_tokens]


def parse_name(name: str) -> ParsedName:
    """Resolve aliases and parse a network name; raise UserError (one line) if it is not valid."""
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"network name must be a non-empty string, got {name!r}")
    text = name.strip().lower()
    text = ALIASES.get(text, text).lower()
    for pattern, rewrite in ALIAS_PATTERNS:
        match = re.fullmatch(pattern, text)
        if match:
            text = rewrite(match).lower()
            break

    def unknown(why: str) -> UserError:
        return UserError(f"unknown network '{name}' ({why}); valid names: {_grammar()}; "
                         f"aliases such as ConvNet, ConvNetD4, ConvNetBN, conv3in, resnet10apin, VGG11BN")

    head, *rest = text.split("-")
    fam = FAMILIES.get(head)
    if fam is None:
        raise unknown(f"no family '{head}'")
    depth = None
    if fam.depths:
        if not rest or not rest[0].isdigit() or int(rest[0]) not in fam.depths:
            raise unknown(f"{fam.title} needs a depth from {list(fam.depths)}")
        depth, rest = int(rest[0]), rest[1:]

    options: dict[str, object] = {}
    for token in rest:
        found = dict(fam.tokens.get(token, {}))
        for prefix, option in fam.int_tokens.items():
            if token.startswith(prefix) and token[len(prefix):].isdigit():
                found = {option: int(token[len(prefix):])}
        if not found:
            raise unknown(f"suffix '{token}' is not one of {_token_spellings(fam)}")
        clash = [k for k in found if k in options]
        if clash:
            raise unknown(f"suffix '{token}' sets '{clash[0]}' twice")
        options.update(found)

    return ParsedName(_render(fam, depth, options), fam, depth, options)


def _render(fam: Family, depth: int | None, options: Mapping[str, object]) -> str:
    """Canonical spelling: defaults dropped, suffixes in the family's token order."""
    parts = [fam.title] + ([str(depth)] if depth is not None else [])
    shown = {k: v for k, v in options.items() if fam.defaults.get(k, object()) != v}
    for token, sets in fam.tokens.items():
        if sets and all(shown.get(k, object()) == v for k, v in sets.items()):
            parts.append(token if token == "modified" else token.upper())
    for prefix, option in fam.int_tokens.items():
        if option in shown:
            parts.append(f"{prefix}{shown[option]}")
    return "-".join(parts)


def canonical_name(name: str) -> str:
    """The canonical spelling of a name or alias, e.g. `ConvNetD4` -> `ConvNet-4`."""
    return parse_name(name).canonical


def list_networks() -> list[str]:
    """The canonical names of the registered architectures (suffix variants are valid too)."""
    return [n for fam in FAMILIES.values() for n in fam.listed]


def get_network(name: str, channels: int, num_classes: int, resolution: int,
                weights: str | Path | None = None, **kwargs) -> nn.Module:
    """Build a freshly initialised network for N x channels x resolution x resolution input.

    `kwargs` are builder options (e.g. `norm`, `width`, `pool`, `act` for ConvNet; `norm`, `layout`,
    `width` for ResNetAP); an option the name already fixes must agree with it. `weights` is an optional
    path to a state_dict (see load_weights). Every returned network has `embed(x)` and `classifier`,
    with `net.classifier(net.embed(x)) == net(x)`.
    """
    parsed = parse_name(name)
    for what, value in (("channels", channels), ("num_classes", num_classes), ("resolution", resolution)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{what} must be a positive integer, got {value!r}")

    accepted = list(inspect.signature(parsed.family.build).parameters)[3:]
    if parsed.depth is not None:
        accepted.remove("depth")
    for key, value in kwargs.items():
        if key not in accepted:
            raise UserError(f"network {parsed.canonical} does not take option '{key}' "
                            f"(it takes: {', '.join(accepted) or 'none'})")
        if key in parsed.options and parsed.options[key] != value:
            raise UserError(f"option {key}={value!r} contradicts the name {name} ({key}={parsed.options[key]!r})")
    options = {**parsed.options, **kwargs}
    if parsed.depth is not None:
        options["depth"] = parsed.depth

    net = parsed.family.build(channels, num_classes, resolution, **options)
    if weights is not None:
        load_weights(net, weights)
    return net


def _unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """Find the state_dict inside a checkpoint: descend through `state_dict` / `model` entries (the
    SRe2L/RDED/DWA squeeze checkpoints nest it) and strip DataParallel / torch.compile prefixes."""
    while isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint holds a {type(obj).__name__}, not a state_dict")
    state = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        state[key] = value
    return state


def load_weights(net: nn.Module, path: str | Path) -> nn.Module:
    """Load a state_dict file into `net` (strict; tensors only, `weights_only=True`; never downloads)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path} (pass the path of a saved state_dict)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or non-tensor pickle: report it as one line
        raise UserError(f"cannot read weights {path}: {type(err).__name__}: {err}".splitlines()[0]) from err
    state = _unwrap_state_dict(obj)
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of the wrong shape
        raise UserError(f"weights {path} do not fit {type(net).__name__}: "
                        f"{' '.join(str(err).split())[:300]}") from err
    problems = [f"missing {k}" for k in result.missing_keys] + [f"unexpected {k}" for k in result.unexpected_keys]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"weights {path} do not fit {type(net).__name__}: {', '.join(problems[:3])}{more}")
    return net


def eval_pool(mode: str, train_net: str) -> list[str]:
    """Canonical names of the networks evaluated in `--eval-mode mode` for a set made with `train_net`."""
    if mode not in EVAL_POOLS:
        raise UserError(f"unknown eval mode '{mode}'; valid: {', '.join(EVAL_POOLS)}")
    names = [canonical_name(train_net) if n == SAME else canonical_name(n) for n in EVAL_POOLS[mode]]
    return list(dict.fromkeys(names))
