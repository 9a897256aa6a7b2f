"""Looking inside models: ``mtl summary`` (a torchsummary-style layer table) and ``mtl features`` (feature-map grids).

``summary_table(model, (C, H, W), forward=None, depth=None)`` works on any ``nn.Module`` (a ProgressiveNet too:
``forward=lambda x: net(x, task="b")``). It runs one forward pass in eval mode without gradients on a seeded random
batch of 2 (BatchNorm-safe), with a forward hook on every module, and restores every module's training flag after.

Rows: every module that owns parameters or has no children, named as in ``named_modules()``; its type; its output
shape (batch shown as -1; dicts as their ``"out"`` entry or their keys; a module called several times shows its
first call and ``xN``); the parameters it owns itself (children not counted); ``trainable``, ``frozen`` or
``partly``. With ``depth=N`` only modules at most N dots deep are listed, and a module at depth N that has
children stands for its whole subtree (all its parameters). Containers that never run themselves (modules of a
torch.fx-traced encoder such as ``encoder.layer1``, whose children the graph calls directly) show the output of the
last module that ran inside them; ModuleList and ModuleDict show ``--``.

Totals count every parameter once. Sizes follow torchsummary: 4 bytes per value, per sample (batch 1); the
forward/backward pass size is ``2 x`` (outputs and their gradients) the sum of the output elements of every
listed-at-full-depth module call, which over-counts modules whose output is also their parent's (an estimate).
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchvision.utils import make_grid, save_image

from mtl.core.errors import UserError
from mtl.core.runtime import evaluating
from mtl.models.arch import Architecture
from mtl.models.encoders import check_input_size
from mtl.workflows.runs import image_tensor, load_model

_MB = 1024.0**2
_BATCH = 2  # BatchNorm-safe even if a module were left in train mode
_TILE = 32  # feature maps smaller than this (in pixels) are enlarged by an integer factor in the grids


def _device_dtype(model: nn.Module) -> Tuple[Optional[torch.device], torch.dtype]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return None, torch.float32


def _tensors(obj: Any) -> List[Tensor]:
    """Every tensor in a (nested) output."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _per_sample(t: Tensor, batch: int) -> int:
    return t.numel() // batch if t.dim() and t.shape[0] == batch else t.numel()


def _shape(t: Tensor, batch: int) -> str:
    dims = list(t.shape)
    if dims and dims[0] == batch:
        dims[0] = -1
    return "[" + ", ".join(str(d) for d in dims) + "]"


def format_output(obj: Any, batch: int = _BATCH) -> str:
    """A compact shape text: ``[-1, 64, 8, 8]``; a dict as ``out: [-1, 512]`` or ``a: [..], b: [..]`` or its keys."""
    if isinstance(obj, Tensor):
        return _shape(obj, batch)
    if isinstance(obj, dict):
        if isinstance(obj.get("out"), Tensor):
            rest = len(obj) - 1
            return f"out: {_shape(obj['out'], batch)}" + (f" (+{rest} maps)" if rest else "")
        if 0 < len(obj) <= 2 and all(isinstance(v, Tensor) for v in obj.values()):
            return ", ".join(f"{k}: {_shape(v, batch)}" for k, v in obj.items())
        keys = list(obj)
        return "{" + ", ".join(map(str, keys[:4])) + (", ..." if len(keys) > 4 else "") + "}"
    if isinstance(obj, (list, tuple)):
        parts = [format_output(v, batch) for v in obj]
        if len(parts) <= 2:
            return ", ".join(parts)
        return f"{parts[0]}, ... ({len(parts)} outputs)"
    return "--" if obj is None else type(obj).__name__


def _depth(name: str) -> int:
    return name.count(".")


def _status(params: Sequence[nn.Parameter]) -> str:
    if not params:
        return ""
    trains = [p.requires_grad for p in params]
    return "trainable" if all(trains) else "frozen" if not any(trains) else "partly"


def _unique(params: Iterator[nn.Parameter]) -> List[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _record_calls(model: nn.Module, names: Sequence[str], run: Callable[[], Any]) -> List[Tuple[str, Any]]:
    """``(module name, output)`` of every call of the named modules during ``run()``, in call order."""
    calls: List[Tuple[str, Any]] = []
    modules = dict(model.named_modules())
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            calls.append((name, output))

        return record

    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(hook(name)))
        run()
    finally:
        for h in handles:
            h.remove()
    return calls


def _inside(name: str, parent: str) -> bool:
    return parent == "" or name == parent or name.startswith(parent + ".")


def _fallback_output(name: str, module: nn.Module, calls: Sequence[Tuple[str, Any]]) -> Tuple[Optional[int], Any]:
    """For a container that did not run itself: (call index, output) of the last call inside it, if it may
    stand for it (not for ModuleList / ModuleDict, whose members run separately)."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return None, None
    for i in range(len(calls) - 1, -1, -1):
        if _inside(calls[i][0], name) and calls[i][0] != name:
            return i, calls[i][1]
    return None, None


# ---------------------------------------------------------------------------------------------------- summary
def parse_input(text: Optional[str], image_size: int) -> Tuple[int, ...]:
    """``"3,224,224"`` -> (3, 224, 224); None -> (3, image_size, image_size)."""
    if text is None:
        return (3, image_size, image_size)
    parts = [p.strip() for p in str(text).replace("x", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"--input {text!r}: give the input shape as three positive integers C,H,W, e.g. 3,224,224")
    return shape


def summary_table(
    model: nn.Module,
    input_shape: Sequence[int],
    forward: Optional[Callable[[Tensor], Any]] = None,
    depth: Optional[int] = None,
) -> str:
    """A torchsummary-style table of ``model`` for one input of shape ``input_shape`` (C, H, W).

    ``forward(x)`` runs the model (default ``model(x)``), e.g. ``lambda x: net(x, task="b")`` for a
    ProgressiveNet. ``depth``: list only modules at most that many dots deep. See the module docstring.
    """
    shape = tuple(int(s) for s in input_shape)
    if not shape or min(shape) < 1:
        raise UserError(f"input shape must be positive integers, got {tuple(input_shape)!r}")
    if depth is not None and depth < 0:
        raise UserError(f"--depth must be 0 or more, got {depth}")
    forward = forward or model
    modules = dict(model.named_modules())
    order = {n: i for i, n in enumerate(modules)}
    # Rows at full depth: modules that own parameters or are leaves (the root only if it owns parameters).
    full = [
        n
        for n, m in modules.items()
        if list(m.parameters(recurse=False)) or (n and not any(True for _ in m.children()))
    ]
    full_set = set(full)
    if depth is None:
        rows = full
    else:
        rows = [n for n in modules if n and _depth(n) <= depth and (n in full_set or _depth(n) == depth)]
        rows += [""] if "" in full_set else []
        rows = sorted(rows, key=order.__getitem__)
    hooked = sorted(full_set | set(rows), key=order.__getitem__)

    device, dtype = _device_dtype(model)
    x = torch.randn(_BATCH, *shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)

    def run() -> None:
        with evaluating(model):
            forward(x)

    try:
        calls = _record_calls(model, hooked, run)
    except (RuntimeError, ValueError) as e:  # the input shape does not fit the model
        raise UserError(
            f"the model cannot run on an input of shape {list(shape)}: "
            f"{' '.join(str(e).split())[:200]}; try another --input"
        ) from None

    first: Dict[str, Any] = {}
    count: Dict[str, int] = {}
    for name, out in calls:
        first.setdefault(name, out)
        count[name] = count.get(name, 0) + 1

    table = []
    for name in rows:
        module = modules[name]
        collapsed = depth is not None and _depth(name) == depth and any(True for _ in module.children())
        own = _unique(module.parameters(recurse=collapsed))
        if name in first:
            text = format_output(first[name])
            if count[name] > 1:
                text += f" x{count[name]}"
        else:
            _, out = _fallback_output(name, module, calls)
            text = format_output(out) if out is not None else "--"
        n_params = sum(p.numel() for p in own)
        table.append(
            (name or "(root)", type(module).__name__, text, f"{n_params:,}" if own or n_params else "0", _status(own))
        )

    params = _unique(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    activations = sum(_per_sample(t, _BATCH) for name, out in calls if name in full_set for t in _tensors(out))
    input_mb = math.prod(shape) * 4 / _MB
    pass_mb = 2 * activations * 4 / _MB
    params_mb = total * 4 / _MB

    header = ("Layer (name)", "Type", "Output Shape", "Param #", "Trains")
    widths = [max(len(header[i]), *(len(r[i]) for r in table)) if table else len(header[i]) for i in range(5)]
    line_width = sum(widths) + 2 * 4

    def fmt(r: Sequence[str]) -> str:
        cells = (
            r[0].ljust(widths[0]),
            r[1].ljust(widths[1]),
            r[2].rjust(widths[2]),
            r[3].rjust(widths[3]),
            r[4].ljust(widths[4]),
        )
        return "  ".join(cells).rstrip()

    lines = ["-" * line_width, fmt(header), "=" * line_width]
    lines += [fmt(r) for r in table]
    lines += [
        "=" * line_width,
        f"Total params: {total:,}",
        f"Trainable params: {trainable:,}",
        f"Non-trainable params: {total - trainable:,}",
        "-" * line_width,
        f"Input size (MB): {input_mb:.2f}",
        f"Forward/backward pass size (MB): {pass_mb:.2f}",
        f"Params size (MB): {params_mb:.2f}",
        f"Estimated Total Size (MB): {input_mb + pass_mb + params_mb:.2f}",
        "-" * line_width,
    ]
    return "\n".join(lines)


def summary_command(
    target: str,
    overrides: Sequence[str] = (),
    input: Optional[str] = None,
    depth: Optional[int] = None,
    stage: Optional[str] = None,
) -> str:
    """``mtl summary``: the layer table of the model a config builds (architecture only, no download) or of a
    run (its best checkpoint), under the config's ``model.freeze``; of a config (or run) with stages, stage
    ``stage``'s (default: the last)."""

    if depth is not None and depth < 0:
        raise UserError(f"--depth must be 0 or more, got {depth}")
    loaded = load_model(target, list(overrides), weights=False, stage=stage, any_stage=True)
    cfg, model = loaded.cfg, loaded.model
    shape = parse_input(input, cfg.data.image_size)
    if input is None and loaded.input_size is not None:  # the size the data set gives the model
        shape = (shape[0], *loaded.input_size)
    encoder = getattr(model, "encoder", None)
    if encoder is not None:
        given = (
            f"--input {input}"
            if input is not None
            else f"data.image_size={cfg.data.image_size} (the default --input)"
            if loaded.input_size is None
            else f"the data set's {shape[1]}x{shape[2]} images (the default --input)"
        )
        check_input_size(encoder, shape[1], shape[2], given, "give another --input (C,H,W)")
    source = f"run {loaded.run_dir}" if loaded.run_dir is not None else f"config {target}"
    title = (
        f"{cfg.name}: encoder {cfg.model.encoder}, tasks {', '.join(loaded.tasks)}, "
        f"freeze {cfg.model.freeze!r} ({source}), input {list(shape)}"
    )
    notes = [f"note: {note}" for note in [*loaded.notes, *getattr(encoder, "notes", ())]]
    if isinstance(encoder, Architecture):
        shared = sum(p.numel() for p in model.shared_parameters())
        owned = sum(p.numel() for p in model.task_parameters())
        rep = encoder.representation or "none (grad_on=representation is refused)"
        notes.append(
            f"note: model.arch={cfg.model.arch}: {shared:,} shared parameters (gradient methods balance their "
            f"gradients), {owned:,} task-owned (heads included); shared representation: {rep}"
        )
    return "\n".join([title, *notes, summary_table(model, shape, depth=depth)])


# ---------------------------------------------------------------------------------------------------- features
def select_modules(model: nn.Module, layers: str) -> List[str]:
    """Module names chosen by ``layers``: comma-separated ``conv`` (every nn.Conv2d), exact module names or
    fnmatch globs over ``named_modules()`` names. In module order. UserError for a name that matches nothing."""
    modules = {n: m for n, m in model.named_modules() if n}
    tokens = [t.strip() for t in str(layers or "").split(",") if t.strip()]
    if not tokens:
        raise UserError("--layers is empty; give conv, or module names or globs such as encoder.layer1.*")
    chosen = set()
    for token in tokens:
        if token == "conv" and token not in modules:
            hit = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
            if not hit:
                raise UserError("--layers conv: the model has no nn.Conv2d; give module names or globs")
        else:
            hit = [n for n in modules if n == token or fnmatch.fnmatchcase(n, token)]
        if not hit:
            close = difflib.get_close_matches(token, list(modules), n=4, cutoff=0.5)
            hint = (
                f"close names: {', '.join(close)}"
                if close
                else f"top-level modules: {', '.join(sorted({n.split('.')[0] for n in modules}))}"
            )
            raise UserError(
                f"--layers: {token!r} names no module of the model; {hint} "
                "(names as in model.named_modules(), e.g. encoder.layer1.0.conv1; globs like encoder.*)"
            )
        chosen.update(hit)
    return [n for n in modules if n in chosen]


def feature_grid(fmap: Tensor, max_maps: int = 64) -> Tensor:
    """A (3, H', W') grid in [0, 1] of the first ``max_maps`` channels of ``fmap`` (C, h, w), each min-max
    normalised on its own; maps smaller than 32 pixels are enlarged by an integer factor (nearest)."""

    maps = fmap[:max_maps].detach().float().cpu().unsqueeze(1)  # (k, 1, h, w)
    lo = maps.amin(dim=(2, 3), keepdim=True)
    hi = maps.amax(dim=(2, 3), keepdim=True)
    maps = torch.where(hi > lo, (maps - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(maps))
    scale = max(1, _TILE // max(maps.shape[-2:]))
    if scale > 1:
        maps = maps.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    nrow = max(1, math.ceil(math.sqrt(maps.shape[0])))
    return make_grid(maps, nrow=nrow, padding=1, pad_value=1.0)


def _safe_filename(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def features_command(
    target: str,
    overrides: Sequence[str] = (),
    image: str = "",
    layers: str = "conv",
    out: Optional[str] = None,
    max_maps: int = 64,
) -> List[Path]:
    """``mtl features``: one PNG grid of feature maps per selected module with a 4-D output, for one image.

    Files ``<index>_<module name>.png`` (index in forward order) in ``out`` (default ``<run>/features`` for a run,
    else ``<out_dir>/features/<name>``, i.e. ``runs/features/<name>``). Returns the paths in forward order. A module
    that runs several times gives its last call's output; selected modules with no 4-D output are skipped (a warning
    says how many).
    """

    if not image or not Path(image).is_file():
        raise UserError(f"--image {image}: no such image file; give the path of a PNG or JPEG file")
    if isinstance(max_maps, bool) or not isinstance(max_maps, int) or max_maps < 1:
        raise UserError(f"--max-maps must be a positive integer, got {max_maps!r}")
    loaded = load_model(target, list(overrides), weights=True)
    model, cfg = loaded.model, loaded.cfg
    x = image_tensor(image, cfg, loaded.input_size)
    if getattr(model, "encoder", None) is not None:
        check_input_size(
            model.encoder,
            x.shape[-2],
            x.shape[-1],
            f"the model's {x.shape[-2]}x{x.shape[-1]} input",
            "change data.image_size (or the data set's own image size in data.options)",
        )
    names = select_modules(model, layers)
    modules = dict(model.named_modules())
    # Hook the selected modules and what runs inside them (for containers that a traced graph never calls).
    hooked = [n for n in modules if n and any(_inside(n, s) for s in names)]
    device, dtype = _device_dtype(model)
    x = x.to(device=device, dtype=dtype)

    def run() -> None:
        with evaluating(model):
            model(x)

    calls = _record_calls(model, hooked, run)
    last: Dict[str, int] = {}
    for i, (name, _) in enumerate(calls):
        last[name] = i
    picked: List[Tuple[int, str, Tensor]] = []
    skipped = []
    for name in names:
        if name in last:
            i, output = last[name], calls[last[name]][1]
        else:
            i, output = _fallback_output(name, modules[name], calls)
        if i is None or not isinstance(output, Tensor) or output.dim() != 4:
            skipped.append(name)
            continue
        picked.append((i, name, output))
    # Forward order; a container standing in for the module that ran last inside it comes after that module.
    picked.sort(key=lambda item: (item[0], item[1] not in last, -_depth(item[1])))

    folder = (
        Path(out)
        if out
        else (loaded.run_dir / "features" if loaded.run_dir is not None else Path(cfg.out_dir) / "features" / cfg.name)
    )
    folder.mkdir(parents=True, exist_ok=True)
    width = max(2, len(str(len(picked) - 1)))
    paths = []
    for index, (_, name, output) in enumerate(picked):
        path = folder / f"{index:0{width}d}_{_safe_filename(name)}.png"
        save_image(feature_grid(output[0], max_maps), path)
        paths.append(path)
    if skipped:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        warnings.warn(f"features: skipped {len(skipped)} selected module(s) without a 4-D feature map output: {shown}")
    if not paths:
        raise UserError(
            f"--layers {layers!r}: none of the {len(names)} selected modules gives a 4-D feature map; "
            "choose convolutions or blocks, e.g. --layers conv"
        )
    return paths
