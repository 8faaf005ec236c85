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


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ValueError(f"the index names shards that are missing from {path}: {missing}")
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise ValueError(f"no model.safetensors or model.safetensors.index.json in {path}")


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
    files = _checkpoint_files(path)

    model = _build_empty(config, dtype, device)
    targets = dict(model.state_dict(keep_vars=True))
    seen: set[str] = set()
    unexpected: list[str] = []
    bad_shapes: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key in TIED_KEYS:
                    continue
                if key not in targets:
                    unexpected.append(key)
                    continue
                t = f.get_tensor(key)
                dst = targets[key]
                if tuple(t.shape) != tuple(dst.shape):
                    bad_shapes.append(f"{key}: checkpoint {tuple(t.shape)} vs model {tuple(dst.shape)}")
                    continue
                with torch.no_grad():
                    dst.copy_(t)  # cast + copy to the device; the mmap'd source is dropped right after
                seen.add(key)
    missing = sorted(set(targets) - seen)
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {sorted(unexpected)[:20]}")
    if bad_shapes:
        problems.append(f"shape mismatches: {bad_shapes[:20]}")
    if problems:
        raise ValueError(f"checkpoint {path} does not match the model config: " + "; ".join(problems))
    return model


def save_pretrained(
    model: Gemma4ForConditionalGeneration, path: str | Path, *, overwrite: bool = False, max_shard_bytes: int = 0
) -> Path:
    """Write ``config.json`` + safetensors in the reference layout (loadable by transformers too).

    Refuses to write into a directory that already holds a checkpoint unless ``overwrite=True``.
    ``max_shard_bytes > 0`` splits the weights into shards with an index, as large checkpoints are stored.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and any(path.glob("*.safetensors")) and not overwrite:
        raise FileExistsError(f"{path} already holds a checkpoint; pass overwrite=True to replace it")
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    cfg = model.config.to_hf_dict()
    cfg["dtype"] = str(model.dtype).replace("torch.", "")
    with open(path / "config.json", "w") as f:
        json.dump(cfg, f, indent=2)
    if max_shard_bytes <= 0:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
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
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    with open(path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                   "weight_map": weight_map}, f, indent=2)
    return path


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
