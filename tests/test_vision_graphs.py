"""The vision tower's CUDA graphs (``TowerGraphs``): bit-identical to the eager tower, never replaying stale inputs
or weights, and the plain eager tower on CPU."""

from __future__ import annotations

import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import random_vision_tower

from gemma4lab import Fusion
from gemma4lab.model.config import Gemma4Config
from gemma4lab.model.processor import Gemma4Processor
from gemma4lab.model.vision import VisionTower
from gemma4lab.runtime.vision_graphs import TowerGraphs, module_tensors


def _tower(cfg: Gemma4Config, device: str = "cpu", dtype: torch.dtype = torch.float32) -> VisionTower:
    return random_vision_tower(cfg.vision, device, dtype)


def _images(cfg: Gemma4Config, sizes: list[tuple[int, int]], seed: int, max_soft_tokens: int | None = None) -> dict:
    rng = np.random.default_rng(seed)
    imgs = [PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    return Gemma4Processor(cfg, max_soft_tokens).preprocess_images(imgs)


@pytest.fixture(scope="module")
def tiny() -> Gemma4Config:
    return Gemma4Config.preset("tiny")


def test_cpu_runs_the_eager_tower(tiny):
    tower = _tower(tiny)
    graphs = TowerGraphs(tower)
    batch = _images(tiny, [(96, 144), (150, 90)], 0, 70)
    pv, ip = batch["pixel_values"], batch["image_position_ids"]
    with torch.no_grad():
        assert torch.equal(graphs(pv, ip), tower(pv, ip))
    assert graphs.stats["eager"] == 1 and graphs.stats["captures"] == 0


def test_bad_arguments_are_refused(tiny):
    tower = _tower(tiny)
    with pytest.raises(TypeError, match="VisionTower"):
        TowerGraphs(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="max_shapes"):
        TowerGraphs(tower, max_shapes=0)
    with pytest.raises(ValueError, match="CUDA device"):
        TowerGraphs(tower, use_graphs=True)


def test_pcg_runner_holds_the_tower_graphs(tiny):
    from gemma4lab.model.loading import random_init
    from gemma4lab.runtime.pcg import PiecewiseCudaGraphRunner

    model = random_init(tiny, dtype=torch.float32, device="cpu", seed=0)
    runner = PiecewiseCudaGraphRunner(model, max_tokens=64, progress=False)
    assert isinstance(runner.tower, TowerGraphs) and runner.tower.tower is model.model.vision_tower


# ---- on the GPU ----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny", "26b-a4b"])
def test_gpu_graph_equals_eager_and_is_never_stale(preset):
    """Bit-identical soft tokens for 1 and 2 images; new pixels of a captured shape give the new images' tokens;
    casting the tower drops its graphs (warned) and the recapture equals the eager tower in the new dtype."""
    cfg = Gemma4Config.preset(preset)
    tower = _tower(cfg, "cuda", torch.bfloat16)
    graphs = TowerGraphs(tower)
    small = 70 if preset == "tiny" else None
    one, two, other = (_images(cfg, s, seed, small) for s, seed in
                       (([(96, 144)], 0), ([(150, 90), (200, 200)], 1), ([(333, 111)], 2)))
    with torch.no_grad():
        for batch in (one, two, other, one):
            pv, ip = batch["pixel_values"].cuda(), batch["image_position_ids"].cuda()
            got = graphs(pv, ip)
            assert torch.equal(got, tower(pv, ip)), "graphed soft tokens differ from the eager tower's"
        assert graphs.stats["captures"] == 2 and graphs.stats["replays"] == 4
        tower.float()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            pv, ip = one["pixel_values"].cuda(), one["image_position_ids"].cuda()
            got = graphs(pv, ip)
        assert any("captured again" in str(x.message) for x in w)
        assert got.dtype == torch.float32 and torch.equal(got, tower(pv, ip))
        assert graphs.stats["captures"] == 3
        # a replaced parameter (not an in-place copy) is another address: captured again, never read stale
        lin = tower.encoder.layers[-1].mlp.down_proj.linear
        lin.weight = torch.nn.Parameter(lin.weight.detach() * 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = graphs(pv, ip)
        assert torch.equal(got, tower(pv, ip)) and graphs.stats["captures"] == 4
        # the fused encoder is another program: captured again, and the graph equals the fused eager tower
        tower.encoder.fusion = Fusion.all()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = graphs(pv, ip)
        assert torch.equal(got, tower(pv, ip)) and graphs.stats["captures"] == 5


def test_fused_kernels_are_part_of_what_the_graphs_were_captured_over(tiny):
    """Switching the encoder's fused kernels changes what a graph would replay: the key the graphs are checked
    against changes with it (on a GPU the graphs are then dropped and captured again, as for a cast)."""
    tower = _tower(tiny, "cpu", torch.float32)
    graphs = TowerGraphs(tower)
    before = graphs._weights_key()
    tower.encoder.fusion = Fusion.all()
    assert graphs._weights_key() != before
    tower.encoder.fusion = Fusion()
    assert graphs._weights_key() == before
    import gemma4lab

    model = gemma4lab.random_init(tiny, dtype=torch.float32, seed=0)
    model.set_fusion("all")  # the decoder's switches reach the encoder with one call
    assert model.model.vision_tower.encoder.fusion == Fusion.all() == model.language_model.fusion


def test_the_key_sees_every_tensor_a_replay_would_read(tiny):
    """The fast traversal reads the same tensors as ``parameters()`` + ``buffers()``, and the key changes when a
    parameter is replaced, a buffer is cast or a whole submodule is swapped (all of which a stale graph would miss)."""
    tower = _tower(tiny, "cpu", torch.float32)
    slow = [(t.data_ptr(), t.dtype) for t in (*tower.parameters(), *tower.buffers())]
    assert sorted(((t.data_ptr(), t.dtype) for t in module_tensors(tower)), key=repr) == sorted(slow, key=repr)
    graphs = TowerGraphs(tower)
    key = graphs._weights_key()
    layer = tower.encoder.layers[-1]
    layer.mlp.down_proj.linear.weight = torch.nn.Parameter(layer.mlp.down_proj.linear.weight.clone())
    assert graphs._weights_key() != key
    key = graphs._weights_key()
    tower.encoder.layers[0] = type(layer)(tiny.vision)
    assert graphs._weights_key() != key
    key = graphs._weights_key()
    if tiny.vision.standardize:
        tower.std_bias.data = tower.std_bias.data.double()
        assert graphs._weights_key() != key


def test_the_key_walks_the_modules_again_only_after_a_registration(tiny):
    """Between registrations the key reads its cached tensor list (no walk of the tower's modules); a parameter,
    buffer or submodule registered anywhere makes the next key walk again, and a cast in place (``.data =``, as
    ``.to()`` does) is seen without one, by address and dtype."""
    tower = _tower(tiny, "cpu", torch.float32)
    graphs = TowerGraphs(tower)
    graphs._weights_key()
    cached = graphs._tensors
    graphs._weights_key()
    assert graphs._tensors is cached  # nothing registered: not walked again
    key = graphs._weights_key()
    lin = tower.encoder.layers[0].mlp.up_proj.linear
    lin.weight.data = lin.weight.data.double()  # storage swapped in place: no registration, the key still changes
    assert graphs._tensors is cached and graphs._weights_key() != key
    torch.nn.Linear(2, 2)  # a registration anywhere (here in an unrelated module) invalidates the cached list
    graphs._weights_key()
    assert graphs._tensors is not cached


@pytest.mark.gpu
def test_gpu_pcg_image_prompt_uses_the_tower_graph():
    from gemma4lab.model.loading import random_init
    from gemma4lab.runtime.pcg import PiecewiseCudaGraphRunner

    cfg = Gemma4Config.preset("tiny")
    model = random_init(cfg, dtype=torch.bfloat16, device="cuda", seed=0)
    proc = Gemma4Processor(cfg, 70)
    img = PIL.Image.fromarray(np.random.default_rng(3).integers(0, 256, (120, 90, 3), dtype=np.uint8))
    ids = [cfg.text.bos_token_id, 5, 6, cfg.image_token_id, 7, 8]
    batch = {k: v.cuda() for k, v in proc(input_ids=ids, images=[img]).items()}
    prompt = [batch["input_ids"][0]]
    args = (batch["pixel_values"], batch["image_position_ids"], [batch["mm_token_type_ids"][0]])
    runner = PiecewiseCudaGraphRunner(model, max_tokens=256, progress=False)
    with torch.no_grad():
        eager = model.prefill(prompt, *args)
        for _ in range(2):
            assert torch.equal(runner.prefill(prompt, *args), eager)
    assert runner.tower.stats["captures"] == 1 and runner.tower.stats["replays"] == 2
