"""Headless reward-LoRA training from an installed pack, whatever its folder is called.

From ComfyUI's root (paths relative to it):

    python custom_nodes/<this folder>/train.py --model models/EasyAnimate/EasyAnimateV5-12b-zh-InP \
        --reward hps_v2.1 --reward-folder models/reward_models --prompts input/prompts.txt \
        --lora-name models/loras/my-hps-lora.safetensors

The pack imports itself relatively as the package `easyanimate_reward`; a Manager install lives in a
folder with another name (often hyphenated), which Python cannot import by name. This launcher
registers this folder as that package and runs its CLI (`--help` lists every setting).
"""

import importlib.util
import runpy
import sys
from pathlib import Path

PACKAGE = "easyanimate_reward"


def _register_this_folder() -> None:
    here = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location(PACKAGE, here / "__init__.py",
                                                  submodule_search_locations=[str(here)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module  # this folder, even if another copy is importable by that name
    spec.loader.exec_module(module)
    print(f"[train.py] {PACKAGE} from {here}", file=sys.stderr)


if __name__ == "__main__":
    _register_this_folder()
    sys.argv[0] = __file__
    runpy.run_module(f"{PACKAGE}.training", run_name="__main__", alter_sys=False)
