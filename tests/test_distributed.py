"""Data-parallel reward training on CPU with 2 processes (gloo, loopback only, every launch
bounded by a timeout): 2 ranks x batch 1 equal 1 process x batch 2 (same prompts and seeds),
a resume with another number of processes continues the run, a crash or a Ctrl-C on one rank
stops every rank with the last completed step saved and no partial file, and the engines that
cannot run are refused before anything loads.

Measured on the CI machine (float32, tiny V5.1, 2 steps, AdamW lr 1e-2): per-step loss, reward
and pre-clip gradient norm agree to 2e-6 relative; AdamW's first moments to 6e-6 (relative
norm); the LoRA up factors (zero at the start) to 1.1e-5 relative norm; every factor to 3.8e-5
absolute against updates of 1e-2 a step (AdamW divides tiny gradient components by their own
size, so float noise in them shows). The asserted tolerances sit a few times above these.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from easyanimate_reward.training import distributed
from easyanimate_reward.training.__main__ import main
from easyanimate_reward.training.distributed import DataParallel, UnsupportedEngineError, check_engine
from easyanimate_reward.training.run_layout import RunLayout

REPO = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 420  # seconds per launch (start-up of 2 Python processes dominates on 2 loaded cores)
PROMPTS = ["a cat playing piano", "a dog running on the beach", "a red car in the rain", "a bird over the sea"]
HELD_OUT = ["a quiet forest lake", "a city street at night", "a bowl of fruit"]  # 3: rank 0 gets 2, rank 1 gets 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
               PYTHONPATH=str(REPO / ".cache" / "pkgroot"), **extra)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        env.pop(name, None)
    return env


def torchrun(target: list[str], args: list[str], **env) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port())] + target + args
    return subprocess.run(command, env=launch_env(**env), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)


def accelerate_launch(args: list[str]) -> subprocess.CompletedProcess:
    """The documented command with the shipped DDP config (on CPU, --device cpu selects gloo)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
               "-m", "easyanimate_reward.training"] + args
    return subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)


def cli_args(model: Path, folder: Path, output: str, steps: int, batch: int, save_every: int = 0,
             held_out: bool = True) -> list[str]:
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (folder / "held_out.txt").write_text("\n".join(HELD_OUT) + "\n")
    args = ["--model", str(model), "--reward", "saturation + 0.01*colorfulness", "--prompts", str(folder / "prompts.txt"),
            "--lora-name", str(folder / output), "--device", "cpu", "--precision", "fp32", "--memory-mode", "none",
            "--save-dtype", "fp32", "--width", "32", "--height", "32", "--frames", "5", "--sampling-steps", "2",
            "--cfg", "1", "--rank", "4", "--alpha", "4", "--learning-rate", "1e-2", "--weight-decay", "0",
            "--max-grad-norm", "1", "--seed", "0", "--backprop", "tail", "--backprop-k", "2",
            "--no-gradient-checkpointing", "--train-steps", str(steps), "--batch-size", str(batch),
            "--save-every", str(save_every)]
    if held_out:  # validation videos from the held-out prompts too (3 videos: rank 0 samples 2, rank 1 one)
        args += ["--eval-prompts", str(folder / "held_out.txt"), "--eval-every", "2", "--validation-every", "2",
                 "--validation-width", "32", "--validation-height", "32", "--validation-frames", "5",
                 "--validation-steps", "2", "--validation-cfg", "1"]
    return args


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def sidecar(path: Path) -> dict:
    """run.json of the run whose LoRA is `path` (training/run_layout.py)."""
    return json.loads(RunLayout.for_lora_file(path).run_json.read_text())


def optimizer_file(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(RunLayout.for_lora_file(path).state))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def assert_same_run(actual: Path, expected: Path) -> None:
    """Same history and the same LoRA (and AdamW state) within the measured float tolerances."""
    got, want = sidecar(actual)["history"], sidecar(expected)["history"]
    assert got["step"] == want["step"] and got["eval_step"] == want["eval_step"]
    assert got["validation_step"] == want["validation_step"]
    for key in ("loss", "reward", "grad_norm", "eval_reward", "eval_loss", "validation_reward"):
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(want[key]), rtol=2e-5, atol=1e-7,
                                   msg=lambda m: f"{key}: {m}")
    a, b = optimizer_file(actual), optimizer_file(expected)
    assert set(a) == set(b)
    ups = sorted(k for k in a if k.endswith(".up.master"))
    assert rel(torch.cat([a[k].flatten() for k in ups]), torch.cat([b[k].flatten() for k in ups])) < 1e-4
    moments = sorted(k for k in a if k.endswith(".exp_avg"))
    assert rel(torch.cat([a[k].flatten() for k in moments]), torch.cat([b[k].flatten() for k in moments])) < 5e-5
    worst = max(float((a[k] - b[k]).abs().max()) for k in a if k.endswith(".master"))
    assert worst < 2e-4, worst
    lora_a, lora_b = load_file(str(actual)), load_file(str(expected))
    assert max(float((lora_a[k] - lora_b[k]).abs().max()) for k in lora_b) < 2e-4


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    """s2: 1 process x batch 2, 2 steps; d2: accelerate launch, 2 ranks x batch 1, 2 steps;
    s4: 1 process x batch 2, 4 steps; r4: torchrun 2 ranks x batch 1 resuming s2 to step 4."""
    model = tiny_models["v5.1"]
    folder = tmp_path_factory.mktemp("dist")
    assert main(cli_args(model, folder, "s2.safetensors", 2, 2)) == 0
    assert main(cli_args(model, folder, "s4.safetensors", 4, 2)) == 0
    check(accelerate_launch(cli_args(model, folder, "d2.safetensors", 2, 1)))
    resume = cli_args(model, folder, "r4.safetensors", 4, 1) + ["--resume", str(folder / "s2.safetensors")]
    check(torchrun(["-m", "easyanimate_reward.training"], resume))
    return folder


def test_two_ranks_of_batch_one_equal_one_process_of_batch_two(runs):
    assert_same_run(runs / "d2.safetensors", runs / "s2.safetensors")
    info = sidecar(runs / "d2.safetensors")
    assert info["world_size"] == 2 and info["global_batch"] == 2 and info["config"]["batch_size"] == 1
    # Held-out prompts were split over the ranks (2 + 1) and gathered: same scores as one process.
    assert info["history"]["eval_step"] == [0, 2] and (runs / "d2.best.safetensors").is_file()
    # Only rank 0 wrote, and only the run's own files (no per-rank or temporary files).
    written = sorted(p.name for p in runs.iterdir() if p.name.startswith("d2"))
    assert written == ["d2.best.safetensors", "d2.safetensors"]
    run_folder = RunLayout.for_lora_file(runs / "d2.safetensors").folder
    assert sorted(p.name for p in run_folder.iterdir()) == ["checkpoints", "logs", "plot.png", "run.json",
                                                            "training_state.safetensors", "validation"]
    assert len(list((run_folder / "logs").iterdir())) == 1  # one TensorBoard event file: rank 0's
    # Validation videos: the ranks shared them, rank 0 wrote them all, under the names one process uses.
    single = RunLayout.for_lora_file(runs / "s2.safetensors").folder / "validation"
    names = sorted(p.name for p in (run_folder / "validation").iterdir())
    assert names == sorted(p.name for p in single.iterdir()) == [
        "scores.json", "step000002_00.mp4", "step000002_01.mp4", "step000002_02.mp4"]
    assert not [p.name for p in runs.iterdir() if p.name.startswith(".")]


def test_resume_with_another_number_of_processes_continues_the_run(runs):
    """1 process x batch 2 for 2 steps, then 2 ranks x batch 1 (same global batch) to step 4, is
    the uninterrupted 1-process run."""
    assert_same_run(runs / "r4.safetensors", runs / "s4.safetensors")
    assert sidecar(runs / "r4.safetensors")["history"]["step"] == [1, 2, 3, 4]


@pytest.mark.parametrize("fault", ["KILL", "INT"])
def test_a_crash_or_ctrl_c_on_one_rank_stops_all_with_the_last_step_saved(tiny_models, tmp_path, fault):
    """Rank 1 dies (SIGKILL: no clean-up at all) or gets Ctrl-C in its 3rd rollout: every rank
    stops, rank 0 keeps step 2 (saved every step), and no partial or temporary file is left."""
    args = cli_args(tiny_models["v5.1"], tmp_path, "run.safetensors", 6, 1, save_every=1, held_out=False)
    result = torchrun([str(REPO / "tests" / "distributed_worker.py")], args, WORKER_FAULT_RANK="1",
                      WORKER_FAULT_SIGNAL=fault, WORKER_FAULT_AT_CALL="3")
    assert result.returncode != 0, result.stderr[-3000:]
    out = tmp_path / "run.safetensors"
    info = sidecar(out)
    assert info["step"] == 2 and info["history"]["step"] == [1, 2], info["stop_reason"]
    assert info["stop_reason"] != "finished"
    state = optimizer_file(out)
    assert all(torch.isfinite(t).all() for t in state.values())
    run_folder = RunLayout.for_lora_file(out).folder
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".txt") == [
        run_folder.parent.name, "run.safetensors"]  # nothing half-written
    assert sorted(p.name for p in run_folder.iterdir()) == ["checkpoints", "logs", "plot.png", "run.json",
                                                            "training_state.safetensors", "validation"]
    assert not [p for p in run_folder.rglob(".*")]  # no temporary file left anywhere in the run folder
    assert sorted(p.name for p in (run_folder / "checkpoints").iterdir()) == [
        "run-step000001.safetensors", "run-step000002.safetensors"]
    # The kept file resumes (one process, same global batch) to the end.
    assert main(args[:args.index("--batch-size")] + ["--batch-size", "2", "--save-every", "0", "--resume", str(out)]) == 0
    assert sidecar(out)["history"]["step"] == [1, 2, 3, 4, 5, 6]


def test_engines_that_shard_the_weights_are_refused_before_loading(monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert check_engine() == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert check_engine() == "deepspeed"
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    with pytest.raises(UnsupportedEngineError, match="ZeRO stage 3"):
        check_engine()
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UnsupportedEngineError, match="FSDP.*fused"):
        main(["--model", str(tmp_path / "no-such-model"), "--reward", "saturation", "--prompts",
              str(tmp_path / "none.txt"), "--lora-name", str(tmp_path / "x.safetensors")])
    assert not list(tmp_path.glob("x*"))


def test_single_process_helpers_are_no_ops():
    single = DataParallel()
    assert (single.rank, single.world_size, single.is_main, single.active) == (0, 1, True, False)
    assert single.shard(5) == [0, 1, 2, 3, 4] and single.first_of_rank(6, 3) == 6
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    assert single.average_gradients([p], 1.5, -2.0) == (1.5, -2.0) and p.grad.tolist() == [2.0, 2.0, 2.0]
    rows = single.gather_rows([0, 1], [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]])], 2)
    assert rows.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_a_stop_signal_waits_for_the_end_of_a_critical_section():
    import signal

    restore = distributed.install_stop_signals()
    try:
        done = []
        with pytest.raises(distributed.Terminated):
            with distributed.critical():
                os.kill(os.getpid(), signal.SIGTERM)
                done.append("the update finished before the stop")
        assert done
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    finally:
        restore()
    assert signal.getsignal(signal.SIGTERM) is not distributed._on_signal
