"""What a run reports besides its files of weights: TensorBoard scalars and frames in the run
folder's logs/, and the reward/loss plot as plot.png (the image the trainer node shows). Rank 0
only; everything here is a no-op for the other ranks and for runs without a run folder."""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..fileio import atomic_file
from .run_layout import RunLayout

log = logging.getLogger(__name__)


def save_png(path, image: torch.Tensor) -> None:
    """(1, H, W, 3) or (H, W, 3) in [0, 1] -> a PNG, written atomically."""
    from PIL import Image

    pixels = (image.reshape(-1, *image.shape[-3:])[0].clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    with atomic_file(path, suffix=".png") as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


class RunLog:
    """TensorBoard writer of one run (`tensorboard` off, no layout or not rank 0: writes nothing)."""

    def __init__(self, layout: RunLayout | None, config, is_main: bool = True):
        self.config = config
        self.writer = None
        if layout is None or not is_main or not config.tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise RuntimeError(f"tensorboard logging needs the tensorboard package ({e}): `pip install tensorboard`, "
                               "or turn the tensorboard setting off") from None
        layout.logs.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(layout.logs))

    def step(self, step: int, reward: float, loss: float, grad_norm: float, lr: float, seconds: float) -> None:
        if self.writer is None:
            return
        for tag, value in (("train/reward", reward), ("train/loss", loss), ("train/grad_norm", grad_norm),
                           ("train/lr", lr), ("train/step_seconds", seconds)):
            self.writer.add_scalar(tag, value, step)

    def wants_frames(self, step: int) -> bool:
        every = self.config.log_frames_every
        return self.writer is not None and every > 0 and step % every == 0

    def frames(self, step: int, video: torch.Tensor) -> None:
        """The scored part of a rollout, (B, 3, F, H, W) in [0, 1]: every frame of the first video."""
        if self.writer is None:
            return
        first = video[0].detach().float().clamp(0, 1).permute(1, 0, 2, 3).cpu()  # (F, 3, H, W)
        self.writer.add_images("train/frames", first, step, dataformats="NCHW")

    def scalar(self, tag: str, value: float | None, step: int) -> None:
        if self.writer is not None and value is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
