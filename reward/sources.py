"""The one table of the reward models' file names and where the public files come from.

The registry (reward/registry.py) lays a reward_models folder out with these names, the loaders
(hps.py, pickscore.py, mps.py, aesthetic.py, flow.py) name them in their errors, and the tiny
test folders (tiny_clip.py, tiny_aesthetic.py) are written under them.
"""

from __future__ import annotations

# Weights of a transformers model folder, any one of them (beside config.json).
TRANSFORMERS_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

HPS_FILES = {"v2": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_SOURCE = "https://huggingface.co/xswu/HPSv2 (file {name})"

PICKSCORE_FOLDER = "PickScore_v1"
PICKSCORE_SOURCE = (
    "https://huggingface.co/yuvalkirstain/PickScore_v1 (config.json, model.safetensors; tokenizer files optional)"
)

MPS_CHECKPOINT_FILE = "MPS_overall.pth"  # what EasyAnimate re-hosts
MPS_CONVERTED_FILE = "MPS_overall.safetensors"  # what tools/convert_mps_checkpoint.py writes
MPS_CHECKPOINT_FILES = (MPS_CONVERTED_FILE, MPS_CHECKPOINT_FILE)  # looked for in this order
MPS_SOURCE = (
    "the plain state dict EasyAnimate re-hosts for its reward training (MPS_overall.pth), or the original "
    "MPS_overall_checkpoint.pth of https://github.com/Kwai-Kolors/MPS converted to a state dict"
)
MPS_TOKENIZER_FOLDER = "CLIP-ViT-H-14-laion2B-s32B-b79K"
MPS_TOKENIZER_SOURCE = (
    "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K (tokenizer.json or vocab.json + merges.txt)"
)

AESTHETIC_FOLDER = "aesthetic"
AESTHETIC_V2_HEAD = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_V2_HEAD_SOURCE = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth"
)
AESTHETIC_V2_BACKBONE = "clip-vit-large-patch14"
AESTHETIC_V2_BACKBONE_SOURCE = "https://huggingface.co/openai/clip-vit-large-patch14 (config.json + model.safetensors)"
AESTHETIC_V2_5_HEAD = "aesthetic_predictor_v2_5.pth"
AESTHETIC_V2_5_HEAD_SOURCE = (
    "https://github.com/discus0434/aesthetic-predictor-v2-5/raw/main/models/aesthetic_predictor_v2_5.pth"
)
AESTHETIC_V2_5_BACKBONE = "siglip-so400m-patch14-384"
AESTHETIC_V2_5_BACKBONE_SOURCE = (
    "https://huggingface.co/google/siglip-so400m-patch14-384 (config.json + model.safetensors)"
)

RAFT_FILES = {"raft_small": "raft_small_C_T_V2-01064c6d.pth", "raft_large": "raft_large_C_T_SKHT_V2-ff5fadd5.pth"}
RAFT_SOURCE = ("torchvision's {variant} weights (torchvision.models.optical_flow, Raft_{size}_Weights.DEFAULT: "
               "https://download.pytorch.org/models/{file})")
