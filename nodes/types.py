"""Wire types the pack adds to ComfyUI graphs."""

from comfy_api.latest import io

EasyAnimateModelType = io.Custom("EASYANIMATE_MODEL")  # easyanimate.model.EasyAnimateModel
RewardModelType = io.Custom("REWARD_MODEL")  # reward.base.Reward
CameraType = io.Custom("EASYANIMATE_CAMERA")  # easyanimate.camera.CameraPath
# training.settings.TrainingSettings of one group, from a trainer settings node
TrainSettingsTypes = {
    "rollout": io.Custom("EASYANIMATE_REWARD_ROLLOUT_SETTINGS"),
    "optimizer": io.Custom("EASYANIMATE_REWARD_OPTIMIZER_SETTINGS"),
    "evaluation": io.Custom("EASYANIMATE_REWARD_EVALUATION_SETTINGS"),
    "logging": io.Custom("EASYANIMATE_REWARD_LOGGING_SETTINGS"),
}
