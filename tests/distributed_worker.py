"""The training CLI as one rank of a torchrun test, with a fault injected on one rank.

Environment: WORKER_FAULT_RANK (which rank), WORKER_FAULT_SIGNAL ("KILL": a crash that runs no
Python clean-up; "INT": Ctrl-C on that rank only), WORKER_FAULT_AT_CALL (the reward call, 1-based,
during which the signal is sent to the rank's own process). Arguments: the CLI's."""

import os
import signal
import sys

from easyanimate_reward.training import __main__ as cli
from easyanimate_reward.reward.base import Reward


class FaultyReward(Reward):
    def __init__(self, inner: Reward, at_call: int, signum: int):
        super().__init__()
        self.inner, self.at_call, self.signum, self.calls = inner, at_call, signum, 0
        self.name = inner.name

    def score(self, frames, prompts):
        self.calls += 1
        if self.calls == self.at_call:
            os.kill(os.getpid(), self.signum)
        return self.inner(frames, prompts)


def main() -> int:
    rank = int(os.environ.get("RANK", "0"))
    load = cli.load_reward_spec
    if rank == int(os.environ["WORKER_FAULT_RANK"]):
        signum = getattr(signal, "SIG" + os.environ["WORKER_FAULT_SIGNAL"])
        at_call = int(os.environ["WORKER_FAULT_AT_CALL"])
        cli.load_reward_spec = lambda *a, **k: FaultyReward(load(*a, **k), at_call, signum)
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
