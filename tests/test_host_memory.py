"""ComfyUI's memory manager evicts the pack's pipe (nodes/host_memory.py), inside the host process
against the real comfy.model_management (imported, not mocked)."""

import sys

import pytest
import torch

from host import HOST_DIR


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    sys.path.insert(0, str(HOST_DIR))
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management as mm
    import folder_paths

    folder_paths.models_dir = str(tmp_path_factory.mktemp("models"))
    from easyanimate_reward.nodes import common, host_memory

    yield mm, common, host_memory
    sys.path.remove(str(HOST_DIR))


class DemoteSpy:
    def __init__(self, placement):
        self.calls, self.placement = [], placement
        self._demote = placement.demote
        placement.demote = self

    def __call__(self, modules):
        self.calls.append(list(modules))
        return self._demote(modules)


def _entries(mm, host_memory):
    return [e for e in mm.current_loaded_models if isinstance(e, host_memory.PipeEntry)]


def test_a_native_model_load_then_unload_all_models_evicts_our_resident_pipe(host, tiny_models):
    mm, common, host_memory = host
    import comfy.model_patcher

    cache = common.PipeCache()
    pipe = cache.get(str(tiny_models["v5.1"]), "fp32", "none")
    (entry,) = [e for e in _entries(mm, host_memory) if e.patcher._pipe() is pipe]
    assert entry.model_memory() > 0 and entry.model_offloaded_memory() == 0  # reported as resident
    spy = DemoteSpy(pipe.placement)
    # a native model loads after ours (on a CPU host load_models_gpu frees nothing: it skips
    # free_memory for the CPU device); our entry must not disturb it
    native = comfy.model_patcher.ModelPatcher(torch.nn.Linear(4, 4), mm.get_torch_device(), mm.unet_offload_device())
    mm.load_models_gpu([native])
    assert any(e.model is native for e in mm.current_loaded_models) and entry in mm.current_loaded_models
    assert not spy.calls
    # what load_models_gpu calls on a GPU, and what "unload models" does: our pipe is evicted
    mm.free_memory(1e30, mm.get_torch_device(), keep_loaded=[e for e in mm.current_loaded_models
                                                               if e.model is native])
    assert entry not in mm.current_loaded_models and spy.calls
    assert {id(m) for m in spy.calls[0]} == {id(pipe.transformer), id(pipe.vae), id(pipe.text_encoder)}
    assert pipe.placement.mode == "model_cpu_offload"  # no longer resident: moves in only while used
    assert all(p.device == pipe.placement.offload_device for p in pipe.transformer.parameters())
    assert entry.patcher.evictions == 1
    # used again, it is registered again; unload_all_models evicts it the same way
    assert cache.get(str(tiny_models["v5.1"]), "fp32", "none") is pipe
    assert len([e for e in _entries(mm, host_memory) if e.patcher._pipe() is pipe]) == 1
    mm.unload_all_models()
    assert not [e for e in _entries(mm, host_memory) if e.patcher._pipe() is pipe]
    assert len(spy.calls) == 2
