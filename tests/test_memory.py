"""Memory modes (easyanimate/memory.py): block swap (spied moves, the weights each forward sees,
LoRAs fused and unfused, strength changes, training, parity with mode none) and the qfloat8 skip
list."""

import pytest
import torch

from easyanimate_reward.easyanimate.loading import load_pipe
from easyanimate_reward.easyanimate.lora_format import weights_from_tensors
from easyanimate_reward.easyanimate.memory import (
    FLOAT8,
    MEMORY_MODES,
    ModulePlacement,
    float8_skip_patterns,
    quantize_linears_to_float8,
)
from easyanimate_reward.easyanimate.model import EasyAnimateModel
from easyanimate_reward.easyanimate.sampling import SampleRequest, sample_video
from easyanimate_reward.easyanimate.tiny import build_tiny_transformer

SMALL = dict(width=32, height=32, frames=5, steps=2)


@pytest.fixture(scope="module")
def pipes(tiny_models):
    return {mode: load_pipe(tiny_models["v5.1"], "fp32", mode, resident_blocks=1) for mode in ("none", "block_swap")}


def random_lora(transformer, seed=1, rank=2):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and path.startswith("transformer_blocks."):
            tensors[path] = (torch.randn(rank, m.in_features, generator=g) * 0.3,
                             torch.randn(m.out_features, rank, generator=g) * 0.3)
    return weights_from_tensors(tensors, float(rank)), tensors


class BlockSpy:
    """Pre-hooks registered after the swap's own: at each block forward, record whether the swap
    has the block in and a copy of one weight as the forward sees it."""

    def __init__(self, transformer, swap):
        self.seen: list[tuple[int, bool, torch.Tensor]] = []
        self.handles = [block.register_forward_pre_hook(lambda m, a, i=i: self.record(i, m))
                        for i, block in enumerate(transformer.transformer_blocks)]
        self.swap = swap

    def record(self, i, block):
        swapped_index = i - self.swap.resident
        is_in = swapped_index >= 0 and swapped_index in self.swap._home
        self.seen.append((i, is_in, block.attn1.to_q.weight.detach().clone()))

    def remove(self):
        for h in self.handles:
            h.remove()


def test_block_swap_streams_the_swapped_blocks_and_each_forward_sees_the_patched_weight(pipes):
    pipe = pipes["block_swap"]
    swap = pipe.placement.block_swap
    assert swap is not None and swap.resident == 1 and len(swap.swapped) == 1
    assert [m for m in MEMORY_MODES if m.startswith("block_swap")] == ["block_swap_8", "block_swap_16",
                                                                      "block_swap_24", "block_swap_32"]
    placement = ModulePlacement("block_swap_16", "cpu")
    assert (placement.mode, placement.resident_blocks) == ("block_swap", 16)
    block1 = pipe.transformer.transformer_blocks[1]
    base_q = block1.attn1.to_q.weight.detach().clone()
    weights, tensors = random_lora(pipe.transformer)
    down, up = tensors["transformer_blocks.1.attn1.to_q"]
    request = SampleRequest("a cat", seed=3, guidance_scale=1.0, **SMALL)
    for strength in (0.7, -0.3):  # a strength change re-merges into the weights the swap streams
        spy = BlockSpy(pipe.transformer, swap)
        moves_in, moves_out = swap.moves_in, swap.moves_out
        try:
            sample_video(EasyAnimateModel(pipe).with_lora(weights, strength, "l"), request)
        finally:
            spy.remove()
        forwards = SMALL["steps"]
        assert swap.moves_in - moves_in == forwards and swap.moves_out - moves_out == forwards
        assert [(i, is_in) for i, is_in, _ in spy.seen] == [(0, False), (1, True)] * forwards
        expected = base_q + strength * (up @ down)  # alpha / rank = 1
        for i, _, weight in spy.seen:
            if i == 1:
                assert torch.allclose(weight, expected, atol=1e-6), strength
        assert not swap._home  # every swapped block went home after its forward
    sample_video(EasyAnimateModel(pipe), request)  # the LoRA removed: the base weight is back, bitwise
    assert torch.equal(block1.attn1.to_q.weight, base_q)


@pytest.mark.parametrize("mode", ["fused", "unfused"])
def test_block_swap_computes_the_same_video_as_mode_none(pipes, mode):
    request = SampleRequest("a cat", seed=4, **SMALL)
    weights, _ = random_lora(pipes["none"].transformer, seed=2)
    weights = weights.with_mode(mode)
    videos = {}
    for name, pipe in pipes.items():
        videos[name] = sample_video(EasyAnimateModel(pipe).with_lora(weights, 0.5, "l"), request)
        sample_video(EasyAnimateModel(pipe), SampleRequest("x", **SMALL))  # leave it unpatched
    assert torch.equal(videos["block_swap"], videos["none"])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_block_swap_brings_blocks_back_for_backward_and_trains_like_mode_none(pipes, checkpointing):
    from easyanimate_reward.training.lora_layers import LoraLayers

    grads = {}
    for name, pipe in pipes.items():
        if checkpointing:
            pipe.transformer.enable_gradient_checkpointing()
        lora = LoraLayers(pipe.transformer, rank=2, alpha=2.0, seed=0)
        with torch.no_grad():
            for p in lora.up:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(9)) * 0.05)
        lora.attach(pipe.transformer)
        try:
            t = pipe.transformer
            g = torch.Generator().manual_seed(0)
            x = torch.randn(1, 16, 2, 4, 4, generator=g)
            inpaint = torch.zeros(1, 17, 2, 4, 4)
            text = torch.randn(1, 5, t.config.text_embed_dim, generator=g)
            swap = pipe.placement.block_swap
            before = None if swap is None else swap.moves_in
            spy = None if swap is None else BlockSpy(t, swap)
            with pipe.placement.use(t):
                out = t(x, torch.tensor([500.0]), encoder_hidden_states=text, inpaint_latents=inpaint,
                        return_dict=False)[0]
                out.square().mean().backward()
            if swap is not None:
                spy.remove()
                # in for the forward, out, in again for the backward (and its recomputed forward), out
                assert swap.moves_in - before == 2 and swap.moves_out == swap.moves_in and not swap._home
                recomputed = [(1, True), (0, False)] if checkpointing else []  # backward runs last block first
                assert [(i, is_in) for i, is_in, _ in spy.seen] == [(0, False), (1, True)] + recomputed
            grads[name] = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in lora.parameters()]
        finally:
            lora.detach()
            pipe.transformer.disable_gradient_checkpointing()
    assert any(g.abs().sum() > 0 for g in grads["none"])
    # the backward hooks change the order in which autograd sums some gradients: 6e-11 measured
    assert all(torch.allclose(a, b, rtol=0, atol=1e-9) for a, b in zip(grads["none"], grads["block_swap"]))


def test_qfloat8_keeps_the_layers_the_model_keeps_in_high_precision():
    transformer = build_tiny_transformer("v5.1")
    patterns = float8_skip_patterns(transformer)
    assert patterns == tuple(type(transformer)._skip_layerwise_casting_patterns) and "norm" in patterns
    linears = {p: m for p, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    converted = quantize_linears_to_float8(transformer)
    kept = {p for p, m in linears.items() if m.weight.dtype != FLOAT8}
    assert kept == {p for p in linears if ".norm" in "." + p or p == "proj_out"}
    assert "proj_out" in kept and "transformer_blocks.0.norm1.linear" in kept and "norm_out.linear" in kept
    assert converted == len(linears) - len(kept) and "transformer_blocks.0.attn1.to_q" not in kept
    # kept Linears still compute in their own dtype, converted ones upcast
    assert all(m.weight.dtype == torch.float32 for p, m in linears.items() if p in kept)


@pytest.mark.parametrize("mode", ["model_cpu_offload", "model_cpu_offload_and_qfloat8", "sequential_cpu_offload",
                                  "block_swap"])
def test_fused_lora_under_offload_patches_device_copies_and_keeps_only_the_originals_in_ram(tiny_models, mode):
    """Weights rest in RAM unpatched (no backups); each move-in merges into the device copy. On
    the CPU the "device copy" is a second CPU tensor (force_patch_on_move); on a GPU it is VRAM."""
    reference = load_pipe(tiny_models["v5.1"], "fp32", mode, resident_blocks=1)  # patches in place (CPU only)
    pipe = load_pipe(tiny_models["v5.1"], "fp32", mode, resident_blocks=1)
    pipe.placement.force_patch_on_move = True
    resting = {p: m.weight for p, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    original = {p: w.detach().clone() for p, w in resting.items()}
    weights, _ = random_lora(pipe.transformer, seed=5)
    request = SampleRequest("a cat", seed=6, **SMALL)
    seen = []
    q = pipe.transformer.transformer_blocks[1].attn1.to_q
    handle = q.register_forward_pre_hook(lambda m, a: seen.append(m.weight.detach().clone()))
    try:
        videos = [sample_video(EasyAnimateModel(p).with_lora(weights, 0.8, "l"), request) for p in (reference, pipe)]
    finally:
        handle.remove()
    patcher = pipe.lora_patcher
    assert patcher.patch_on_move and patcher.backup_bytes == 0 and not patcher._moved
    assert torch.equal(videos[0], videos[1])
    ref_q = reference.transformer.transformer_blocks[1].attn1.to_q.weight
    assert seen and all(torch.equal(w, ref_q) for w in seen)  # each forward saw the patched weight
    for path, w in resting.items():  # at rest: the very same tensors, unpatched
        m = pipe.transformer.get_submodule(path)
        assert torch.equal(m.weight.detach(), original[path]), path
    # a strength change and removal: no work on the resting weights, same results as in place
    videos = [sample_video(EasyAnimateModel(p).with_lora(weights, -0.4, "l"), request) for p in (reference, pipe)]
    assert torch.equal(videos[0], videos[1])
    plain = [sample_video(EasyAnimateModel(p), request) for p in (reference, pipe)]
    assert torch.equal(plain[0], plain[1])
