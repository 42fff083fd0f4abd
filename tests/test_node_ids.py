"""Node ids are unique across the ecosystem: every id of the pack carries its prefix, and none is
one the official EasyAnimate nodes or the ComfyUI-EasyAnimateWrapper pack register (with both
installed, ComfyUI's load order would decide which class runs)."""

import host

PREFIX = "EasyAnimateReward_"

# NODE_CLASS_MAPPINGS of aigc-apps/EasyAnimate comfyui/comfyui_nodes.py
OFFICIAL_EASYANIMATE_NODE_IDS = {
    "TextBox", "EasyAnimate_TextBox", "LoadEasyAnimateModel", "LoadEasyAnimateLora", "EasyAnimateI2VSampler",
    "EasyAnimateT2VSampler", "EasyAnimateV2VSampler", "EasyAnimateV5_I2VSampler", "EasyAnimateV5_T2VSampler",
    "EasyAnimateV5_V2VSampler", "CreateTrajectoryBasedOnKJNodes", "CameraBasicFromChaoJie",
    "CameraTrajectoryFromChaoJie", "CameraJoinFromChaoJie", "CameraCombineFromChaoJie", "ImageMaximumNode",
}
# NODE_CLASS_MAPPINGS of kijai/ComfyUI-EasyAnimateWrapper nodes.py
WRAPPER_NODE_IDS = {"DownloadAndLoadEasyAnimateModel", "EasyAnimateSampler", "EasyAnimateTextEncode",
                    "EasyAnimateDecode"}


def test_every_node_id_is_prefixed_and_collides_with_no_known_pack(comfy_server):
    info = comfy_server.object_info()
    ours = {name for name, spec in info.items() if host.PACK_NAME in str(spec.get("python_module", ""))}
    assert len(ours) >= 12, sorted(ours)  # the whole pack was found
    assert sorted(n for n in ours if not n.startswith(PREFIX)) == []
    assert ours.isdisjoint(OFFICIAL_EASYANIMATE_NODE_IDS | WRAPPER_NODE_IDS)
    # Display names stay what users know.
    assert info[PREFIX + "Sampler"]["display_name"] == "EasyAnimate Sampler"
