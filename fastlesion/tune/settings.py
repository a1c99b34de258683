"""How a search runs: the numbers ``tune/asha.py`` takes besides the base config and the space."""

from __future__ import annotations

from dataclasses import dataclass

from fastlesion.errors import FastlesionError


@dataclass
class TuneSettings:
    """How the search runs (what ``tune/asha.py`` takes besides the config and the space)."""

    num_samples: int = 16
    max_t: int = 10  # epochs: ASHA's max_t and every trial's train.epochs
    grace_period: int = 1
    reduction_factor: float = 2.0
    gpus_per_trial: float | None = None  # None: 1 where the machine / cluster has GPUs, else 0
    cpus_per_trial: float | None = None  # None: the CPUs divided evenly among the GPU slots (1 without GPUs)
    seed: int = 0  # seed of the random search (the trials' own train.seed comes from the config)
    max_failures: int = 2  # retries of a failed trial (from its last checkpoint); -1 = forever
    ray_verbose: int = 0  # Ray's console output: 0 = fastlesion's line per trial epoch, 1 = status tables, 2 = all

    def check(self) -> None:
        if self.num_samples < 1:
            raise FastlesionError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.max_t < 1:
            raise FastlesionError(f"--epochs (ASHA max_t) must be >= 1, got {self.max_t}")
        if not 1 <= self.grace_period <= self.max_t:
            raise FastlesionError(f"--grace-period must be in 1..{self.max_t} (--epochs), got {self.grace_period}")
        if not self.reduction_factor > 1:
            raise FastlesionError(f"--reduction-factor must be > 1, got {self.reduction_factor}")
        if self.gpus_per_trial is not None:
            g = self.gpus_per_trial
            if g < 0 or (g > 1 and not float(g).is_integer()):
                raise FastlesionError(f"--gpus-per-trial must be 0, a fraction below 1 or a whole number, got {g}")
        if self.cpus_per_trial is not None and not self.cpus_per_trial > 0:
            raise FastlesionError(f"--cpus-per-trial must be > 0, got {self.cpus_per_trial}")
        if self.max_failures < -1:
            raise FastlesionError(f"--max-failures must be >= -1, got {self.max_failures}")

    def rungs(self) -> list[int]:
        """Epochs at which ASHA compares trials (grace_period * reduction_factor**k below max_t)."""
        out, k = [], 0
        while True:
            r = int(self.grace_period * self.reduction_factor ** k)
            if r >= self.max_t:
                return out
            out.append(r)
            k += 1
