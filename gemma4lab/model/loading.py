"""Checkpoints: load a Hugging Face-layout directory, save one, or build random weights at real shapes.

Loading streams: the model is first built on the ``meta`` device (no memory), then allocated once on the target
device, and each tensor is read from the memory-mapped safetensors file, cast, and copied into place. At no point
do two copies of the weights exist. Random initialisation writes straight into device memory, so a 50 GB model
never passes through the host.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from gemma4lab.model.config import Gemma4Config
from gemma4lab.model.multimodal import Gemma4ForConditionalGeneration

TIED_KEYS = {"lm_head.weight"}  # tied to model.language_model.embed_tokens.weight


def _build_empty(config: Gemma4Config, dtype: torch.dtype, device: torch.device) -> Gemma4ForConditionalGeneration:
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(config)
    # Cast on meta (free), then allocate once on the target device in the final dtype.
    model = model.to(dtype=dtype).to_empty(device=device)
    model.init_buffers()
    return model.eval()


SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _checkpoint_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files to read and, for a sharded checkpoint, its key -> shard map.

    Precedence as in transformers: ``model.safetensors`` wins over an index. An index must be valid JSON and name
    only shards inside ``path`` that exist."""
    single = path / SINGLE
    if single.is_file():
        return [single], None
    index = path / INDEX
    if not index.is_file():
        raise ValueError(f"no {SINGLE} or {INDEX} in {path}")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index} is not a safetensors index (JSON with a 'weight_map' object): {e}") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
    root = path.resolve()
    shards = sorted(set(weight_map.values()))
    outside = [s for s in shards if (root / s).resolve().parent != root]
    if outside:
        raise ValueError(f"{index} names shards outside the checkpoint directory: {outside[:5]}")
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
        raise ValueError(f"the index names shards that are missing from {path}: {missing}")
    return [path / s for s in shards], weight_map


def _resolve_dtype(dtype: torch.dtype | str | None, config_path: Path) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        with open(config_path) as f:
            d = json.load(f)
        dtype = d.get("dtype") or d.get("torch_dtype") or (d.get("text_config") or {}).get("dtype") or "float32"
    if not isinstance(dtype, str) or not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or a name like 'bfloat16', got {dtype!r}")
    return getattr(torch, dtype)


def load_pretrained(
    path: str | Path, *, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> Gemma4ForConditionalGeneration:
    """Load a checkpoint directory (``config.json`` + one or sharded ``*.safetensors``) in the reference's key names.

    Raises ``ValueError`` naming every missing or unexpected key and every shape mismatch.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint directory {path} does not exist")
    config = Gemma4Config.from_pretrained(path)
    dtype = _resolve_dtype(dtype, path / "config.json")
    device = torch.device(device or "cpu")
    files, weight_map = _checkpoint_files(path)

    model = _build_empty(config, dtype, device)
    targets = dict(model.state_dict(keep_vars=True))
    embed_key = "model.language_model.embed_tokens.weight"
    seen: set[str] = set()
    unexpected: list[str] = []
    bad_shapes: list[str] = []
    bad_dtypes: list[str] = []
    misplaced: list[str] = []
    head = None
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if weight_map is not None and weight_map.get(key) != file.name:
                    misplaced.append(f"{key} in {file.name} (index: {weight_map.get(key)})")
                    continue
                if key in TIED_KEYS:
                    head = f.get_tensor(key)  # must equal the embeddings: checked below
                    continue
                if key not in targets:
                    unexpected.append(key)
                    continue
                t = f.get_tensor(key)
                dst = targets[key]
                if tuple(t.shape) != tuple(dst.shape):
                    bad_shapes.append(f"{key}: checkpoint {tuple(t.shape)} vs model {tuple(dst.shape)}")
                    continue
                if t.is_floating_point() != dst.is_floating_point():
                    bad_dtypes.append(f"{key}: checkpoint {t.dtype}, model expects {dst.dtype}")
                    continue
                with torch.no_grad():
                    dst.copy_(t)  # cast + copy to the device; the mmap'd source is dropped right after
                seen.add(key)
    if weight_map is not None:
        never = sorted(set(weight_map) - seen - set(unexpected) - TIED_KEYS
                       - {k.split(":")[0] for k in bad_shapes + bad_dtypes} - {m.split(" in ")[0] for m in misplaced})
        if never:
            misplaced.append(f"keys the index names but its shards lack: {never[:10]}")
    if head is not None and embed_key in seen:
        if head.shape != targets[embed_key].shape or not torch.equal(head.to(targets[embed_key].dtype).cpu(),
                                                                      targets[embed_key].detach().cpu()):
            unexpected.append("lm_head.weight (an untied head: Gemma 4 ties it to the token embeddings, and "
                              "gemma4lab supports only that)")
    missing = sorted(set(targets) - seen)
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {sorted(unexpected)[:20]}")
    if bad_shapes:
        problems.append(f"shape mismatches: {bad_shapes[:20]}")
    if bad_dtypes:
        problems.append(f"non-float tensors for float weights: {bad_dtypes[:20]}")
    if misplaced:
        problems.append(f"the index and its shards disagree: {misplaced[:10]}")
    if problems:
        raise ValueError(f"checkpoint {path} does not match the model config: " + "; ".join(problems))
    return model


def _is_checkpoint_file(name: str) -> bool:
    """Files a save writes (and may replace): config, the single file, the index and its shards."""
    return name in ("config.json", SINGLE, INDEX) or (name.startswith("model-") and name.endswith(".safetensors"))


def save_pretrained(
    model: Gemma4ForConditionalGeneration, path: str | Path, *, overwrite: bool = False, max_shard_bytes: int = 0
) -> Path:
    """Write ``config.json`` + safetensors in the reference layout (loadable by transformers too).

    Atomic: everything is written into a temporary directory beside ``path`` and swapped in at the end, so an
    interrupted save leaves the old checkpoint as it was, and a finished one has no stale shard or index left from
    an earlier save. Files in ``path`` that are not checkpoint files (a tokenizer, a README) are kept. Refuses to
    replace an existing checkpoint file (including a lone ``config.json``) unless ``overwrite=True``.
    ``max_shard_bytes > 0`` splits the weights into shards with an index, as large checkpoints are stored.
    """
    import os
    import shutil
    import tempfile

    from safetensors.torch import save_file

    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 0:
        raise ValueError(f"max_shard_bytes must be an int >= 0 (0: one file), got {max_shard_bytes!r}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    existing = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    ours = [n for n in existing if _is_checkpoint_file(n)]
    if ours and not overwrite:
        raise FileExistsError(f"{path} already holds checkpoint files {ours[:5]}; pass overwrite=True to replace them")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.saving-", dir=path.parent))
    try:
        state = {k: _own_storage(v.detach().cpu()) for k, v in model.state_dict().items()}
        cfg = model.config.to_hf_dict()
        cfg["dtype"] = str(model.dtype).replace("torch.", "")
        if max_shard_bytes <= 0:
            save_file(state, str(tmp / SINGLE), metadata={"format": "pt"})
        else:
            _save_shards(state, tmp, max_shard_bytes, save_file)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        for name in existing:  # keep the user's other files: hard links (no copy), or a copy across devices
            if _is_checkpoint_file(name):
                continue
            src, dst = path / name, tmp / name
            if src.is_dir():
                shutil.copytree(src, dst, symlinks=True)
            else:
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor that owns its whole storage: safetensors refuses tensors that share one, and packed
    projections (``gemma4lab.model.packing``) are row-block views of one buffer. Copies only such views."""
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _save_shards(state: dict, out: Path, max_shard_bytes: int, save_file) -> None:
    shards: list[dict] = [{}]
    size = 0
    for k, v in state.items():
        nb = v.numel() * v.element_size()
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nb
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


@torch.no_grad()
def random_init(
    config: Gemma4Config | str,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    seed: int = 0,
    std: float = 0.02,
) -> Gemma4ForConditionalGeneration:
    """A model with random weights at ``config``'s shapes, generated directly on ``device``.

    Norm weights, scales and the layer scalar are drawn around 1 (not exactly 1) so that every multiply in the
    fused kernels is exercised; matrices are N(0, std). Timings on these weights equal those of trained weights.
    """
    if isinstance(config, str):
        config = Gemma4Config.preset(config)
    device = torch.device(device)
    model = _build_empty(config, dtype, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("inv_freq_sliding") or name.endswith("inv_freq_full") or not p.is_floating_point():
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.dim() == 1 or leaf in ("layer_scalar", "std_scale"):
            # norms, router scale, per-expert scale, layer scalar, std_scale: around 1
            p.normal_(0.0, 0.1, generator=gen).add_(1.0)
        elif leaf == "std_bias":
            p.normal_(0.0, 0.1, generator=gen)
        else:
            fan_in = p.shape[-1]
            p.normal_(0.0, min(std, 1.0 / math.sqrt(fan_in)) if leaf != "position_embedding_table" else std,
                      generator=gen)
    return model
