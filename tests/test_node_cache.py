"""The loader's cache inside the host process: same folder + options = no reload; another model
replaces it. Runs the pack's node glue against the real ComfyUI modules (imported, not mocked)."""

import sys

import pytest

from host import HOST_DIR


@pytest.fixture(scope="module")
def common(tmp_path_factory):
    sys.path.insert(0, str(HOST_DIR))
    from comfy.cli_args import args

    args.cpu = True  # what `main.py --cpu` sets before model management picks a device
    import folder_paths

    base = tmp_path_factory.mktemp("models")
    folder_paths.models_dir = str(base)
    from easyanimate_reward.nodes import common as node_common

    yield node_common
    sys.path.remove(str(HOST_DIR))


def test_same_folder_and_options_reuse_the_loaded_pipe(common, tiny_models):
    cache = common.PipeCache()
    first = cache.get(str(tiny_models["v5"]), "fp32", "none")
    assert cache.get(str(tiny_models["v5"]), "fp32", "none") is first
    other = cache.get(str(tiny_models["v5"]), "fp32", "model_cpu_offload")
    assert other is not first
    third = cache.get(str(tiny_models["v5.1"]), "fp32", "model_cpu_offload")
    assert third.version == "v5.1" and cache.get(str(tiny_models["v5.1"]), "fp32", "model_cpu_offload") is third
    assert cache.loads == 3


def test_the_cache_does_not_keep_a_model_nobody_uses(common, tiny_models):
    import gc
    import weakref

    cache = common.PipeCache()
    pipe = cache.get(str(tiny_models["v5"]), "fp32", "none")
    alive = weakref.ref(pipe)
    del pipe  # what ComfyUI's "free model and node cache" does to its cached node outputs
    gc.collect()
    assert alive() is None, "the loader cache must not keep a pipe alive on its own"
    cache.get(str(tiny_models["v5"]), "fp32", "none")
    assert cache.loads == 2


def test_model_names_never_escape_the_models_folder(common):
    for bad, problem in (("../x", "it has '..'"), ("/etc", "it is absolute"), ("a/b", "it has path separators"),
                         ("..", "it is empty"), ("", "it is empty")):
        with pytest.raises(ValueError, match=rf"must be a plain name inside .*\({problem}"):
            common.resolve_model_folder(bad)
    for bad, problem in (("../x", "it has '..'"), ("/abs/path", "it is absolute"), ("a/../../b", "it has '..'")):
        with pytest.raises(ValueError, match=rf"must be a relative path inside .*\({problem}"):
            common.output_subpath(bad)
