"""Atomic writes (easyanimate_reward.fileio): complete files under the final name or nothing."""

import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from easyanimate_reward.fileio import (
    atomic_file,
    atomic_folder,
    confined_path,
    save_safetensors_atomic,
    torch_save_atomic,
    write_text_atomic,
)


class Boom(Exception):
    pass


def test_atomic_file_success_creates_parents_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "b" / "out.bin"
    with atomic_file(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        assert not target.exists()  # nothing under the final name while writing
        tmp.write_bytes(b"complete")
    assert target.read_bytes() == b"complete"
    assert os.listdir(target.parent) == ["out.bin"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's owner-only mode


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_atomic_file_error_keeps_old_file_and_removes_temp(tmp_path, error):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(error):
        with atomic_file(target) as tmp:
            tmp.write_text("half-writ")
            raise error()
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_write_text_atomic_overwrites(tmp_path):
    target = tmp_path / "sidecar.json"
    write_text_atomic(target, "first")
    assert write_text_atomic(target, "zweite \u00e9tape\n") == target
    assert target.read_text(encoding="utf-8") == "zweite \u00e9tape\n"
    assert os.listdir(tmp_path) == ["sidecar.json"]


def test_save_safetensors_atomic_reloads_and_failure_keeps_old(tmp_path):
    target = tmp_path / "w.safetensors"
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    save_safetensors_atomic(target, tensors, metadata={"format": "pt", "step": "3"})
    loaded = load_file(str(target))
    assert set(loaded) == {"a", "b"} and torch.equal(loaded["a"], tensors["a"]) and torch.equal(loaded["b"], tensors["b"])
    before = target.read_bytes()
    shared = torch.zeros(4)
    with pytest.raises(RuntimeError):  # safetensors refuses tensors sharing storage, mid-save
        save_safetensors_atomic(target, {"x": shared, "y": shared})
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_torch_save_atomic_reloads_weights_only(tmp_path):
    target = tmp_path / "head.pth"
    state = {"layers.0.weight": torch.randn(3, 2)}
    torch_save_atomic(target, state)
    loaded = torch.load(target, weights_only=True)
    assert torch.equal(loaded["layers.0.weight"], state["layers.0.weight"])


def test_atomic_folder_success_in_a_unique_temporary_folder(tmp_path):
    dest = tmp_path / "model"
    with atomic_folder(dest) as partial:
        assert partial.parent == tmp_path and partial.name.startswith(".model.") and list(partial.iterdir()) == []
        assert not dest.exists()
        (partial / "sub").mkdir()
        (partial / "sub" / "config.json").write_text("{}")
    assert (dest / "sub" / "config.json").read_text() == "{}"
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_atomic_folder_error_removes_partial_and_keeps_dest(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "good.bin").write_bytes(b"good")
    with pytest.raises(Boom):
        with atomic_folder(dest, replace=True) as partial:
            (partial / "half.bin").write_bytes(b"half")
            raise Boom()
    assert os.listdir(dest) == ["good.bin"]
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_atomic_folder_existing_dest_needs_replace(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "old.bin").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="model"):
        with atomic_folder(dest):
            pytest.fail("the body must not run when dest exists")
    assert os.listdir(dest) == ["old.bin"]
    with atomic_folder(dest, replace=True) as partial:
        (partial / "new.bin").write_bytes(b"new")
    assert os.listdir(dest) == ["new.bin"]
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_atomic_folder_dest_appearing_meanwhile_is_not_clobbered(tmp_path):
    dest = tmp_path / "model"
    with pytest.raises(FileExistsError):
        with atomic_folder(dest) as partial:
            (partial / "new.bin").write_bytes(b"new")
            dest.mkdir()  # someone else saved under the same name while we worked
            (dest / "theirs.bin").write_bytes(b"theirs")
    assert os.listdir(dest) == ["theirs.bin"]
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_confined_path_keeps_names_inside_the_folder(tmp_path):
    from easyanimate_reward.fileio import confined_path

    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    assert confined_path(root, "sub/file.txt") == root / "sub" / "file.txt"
    assert confined_path(root, "plain", plain_name=True) == root / "plain"
    # A symlink the user put in the folder (a model on another disk) is theirs to follow.
    assert confined_path(root, "link", plain_name=True) == root / "link"
    for bad in ("", "..", "../x", "/abs", "~/x", "a/../../x", "sub/../../x", "bad\x01name"):
        with pytest.raises(ValueError, match="must be a relative path inside"):
            confined_path(root, bad)
    for bad in ("a/b", "a\\b", "c:x", "..", "sub/x"):
        with pytest.raises(ValueError, match="must be a plain name inside"):
            confined_path(root, bad, plain_name=True)


def test_confined_path_can_refuse_links_that_lead_out(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    assert confined_path(root, "link/x.safetensors") == root / "link" / "x.safetensors"  # the user's own set-up
    with pytest.raises(ValueError, match="resolves to .*outside the folder"):
        confined_path(root, "link/x.safetensors", links_inside=True)
    assert confined_path(root, "x.safetensors", links_inside=True) == root / "x.safetensors"
    with pytest.raises(ValueError, match="not a name"):
        confined_path(root, None)
