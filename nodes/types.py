"""Wire types the pack adds to ComfyUI graphs."""

from comfy_api.latest import io

EasyAnimateModelType = io.Custom("EASYANIMATE_MODEL")  # easyanimate.model.EasyAnimateModel
RewardModelType = io.Custom("REWARD_MODEL")  # reward.base.Reward
CameraType = io.Custom("EASYANIMATE_CAMERA")  # easyanimate.camera.CameraPath
