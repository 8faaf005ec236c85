"""gemma4lab: Gemma 4 26B-A4B in readable PyTorch, fused Triton kernels, and piecewise CUDA graphs for prefill.

Public API::

    import gemma4lab
    model = gemma4lab.load_pretrained("path/to/checkpoint", dtype="bfloat16", device="cuda")
    out = model(input_ids, pixel_values=..., image_position_ids=..., mm_token_type_ids=...)   # .logits [B, T, V]
    ids = model.generate(input_ids, max_new_tokens=32)
    model.set_fusion("all")                                   # fused Triton kernels on
    runner = gemma4lab.PiecewiseCudaGraphRunner(model)        # piecewise CUDA graphs for prefill
    gemma4lab.quantize_experts(model)                         # FP8 (e4m3) expert weights, per-channel scales

    # or transformers' own Gemma 4, patched in place (generate, the processor, adapters keep working):
    with gemma4lab.patch_transformers(hf_model, fusion="all", pcg=True):   # pcg: prefill through the runner
        hf_model.generate(**inputs)
"""

from gemma4lab.model.config import Gemma4Config, TextConfig, VisionConfig
from gemma4lab.model.loading import load_pretrained, random_init, save_pretrained
from gemma4lab.model.multimodal import Gemma4ForConditionalGeneration, ModelOutput
from gemma4lab.model.quantize import quantize_experts
from gemma4lab.runtime.fusion import Fusion

__all__ = [
    "Fusion",
    "Gemma4Config",
    "Gemma4ForConditionalGeneration",
    "Gemma4Processor",
    "ModelOutput",
    "PiecewiseCudaGraphRunner",
    "TextConfig",
    "VisionConfig",
    "load_pretrained",
    "patch_transformers",
    "quantize_experts",
    "random_init",
    "save_pretrained",
]


def __getattr__(name: str):
    # Heavier pieces load on first use so that ``import gemma4lab`` stays cheap.
    if name == "Gemma4Processor":
        from gemma4lab.model.processor import Gemma4Processor

        return Gemma4Processor
    if name in ("PiecewiseCudaGraphRunner", "DecodeGraphRunner"):
        from gemma4lab.runtime import decode_graphs, pcg

        return getattr(pcg if name == "PiecewiseCudaGraphRunner" else decode_graphs, name)
    if name == "patch_transformers":
        from gemma4lab.runtime.hf_patch import patch_transformers

        return patch_transformers
    raise AttributeError(f"module 'gemma4lab' has no attribute {name!r}")
