"""How long a run will take on this machine, said before it starts.

:func:`measure_machine` times two small fixed workloads for a few seconds: a 3-D convolution
network's forward and backward pass in torch (what training and inference spend their time on)
and array work in NumPy/SciPy (synthesis, import, resampling, metrics). Their times against the
same workloads on the reference machine (:data:`REFERENCE`, a 2-core AVX2 CPU without bfloat16
units, where the step times were measured in a demo run) scale each step's reference time.
Training steps with a wall-clock budget take their budget plus the planning and preprocessing
around it, scaled the same way.

:func:`estimate_run` gives the expected seconds of each notebook step of a run;
:func:`format_estimate` the lines ``spinemets run`` prints before the first notebook.
The estimate is a guide: a machine that is busy with other work, or a slower disk, takes longer.
"""

from __future__ import annotations

import os
import time
from typing import Mapping, Sequence

import numpy as np

#: The reference machine and the demo's step times on it (seconds; training steps without their
#: budget). Measured with ``spinemets run --profile demo`` on a 2-core AVX2 CPU (no AVX-512, no
#: bfloat16 units); ``torch_s`` and ``numpy_s`` are :func:`measure_machine` on that machine.
REFERENCE: dict = {
    "machine": "2 cores, AVX2 (no AVX-512, no bfloat16 units)",
    "torch_s": 0.070,
    "numpy_s": 0.019,
    "steps": {
        "demo": {
            "01_dataset": 10.0,
            "02_slicer": 28.0,
            "03_training_vertebrae": 45.0,
            "03_training_metastases": 40.0,
            "04_inference": 60.0,
            "05_metrics": 6.0,
            "06_external": 22.0,
            "book": 15.0,
        },
    },
}


def _torch_workload():
    import torch

    net = torch.nn.Sequential(torch.nn.Conv3d(1, 16, 3, padding=1), torch.nn.LeakyReLU(),
                              torch.nn.Conv3d(16, 16, 3, padding=1), torch.nn.LeakyReLU(),
                              torch.nn.Conv3d(16, 4, 1))
    x = torch.randn(2, 1, 24, 32, 32)

    def step():
        net.zero_grad()
        net(x).square().mean().backward()

    return step


def _numpy_workload():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    volume = rng.normal(size=(48, 64, 64)).astype(np.float32)

    def step():
        smooth = ndimage.gaussian_filter(volume, 1.5)
        labels, _ = ndimage.label(smooth > 0.1)
        ndimage.zoom(smooth, 0.75, order=1)
        np.percentile(smooth, [1, 50, 99])
        return labels

    return step


def _median_time(step, seconds: float) -> float:
    step()  # warm-up: first calls allocate and pick kernels
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_machine(seconds: float = 3.0) -> dict:
    """Seconds per iteration of the torch and NumPy workloads on this machine (about ``seconds`` in all)."""
    import torch

    return {"torch_s": _median_time(_torch_workload(), seconds / 2),
            "numpy_s": _median_time(_numpy_workload(), seconds / 2),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch_capability": torch.backends.cpu.get_cpu_capability()}


def speed_ratio(machine: Mapping) -> float:
    """How much longer than the reference machine this one takes (1.0: as fast; 0.5: twice as fast)."""
    return 0.5 * (machine["torch_s"] / REFERENCE["torch_s"] + machine["numpy_s"] / REFERENCE["numpy_s"])


def has_reference(profile_name: str, steps: Sequence[str], budgets: Mapping[str, float | None]) -> bool:
    """Whether :func:`estimate_run` can estimate these steps: the profile has reference times for
    each, and each training step (a key of ``budgets``) has a wall-clock budget."""
    reference = REFERENCE["steps"].get(profile_name)
    return (reference is not None and all(step in reference for step in steps)
            and all(budgets[step] for step in steps if step in budgets))


def estimate_run(profile_name: str, steps: Sequence[str], budgets: Mapping[str, float | None],
                 machine: Mapping, book: bool = True) -> dict[str, float] | None:
    """Expected seconds per step (and ``book``) of a run, or None when the profile has no reference times.

    ``steps``: the run's step names (``01_dataset``, ``03_training_vertebrae``, ...); ``budgets``:
    the training budget in seconds per training step (None: not budgeted; such a run has no estimate).
    """
    if not has_reference(profile_name, steps, budgets):
        return None
    reference = REFERENCE["steps"][profile_name]
    ratio = speed_ratio(machine)
    out = {step: reference[step] * ratio + float(budgets.get(step) or 0.0) for step in steps}
    if book:
        out["book"] = reference["book"] * ratio
    return out


def format_estimate(expected: Mapping[str, float], machine: Mapping) -> list[str]:
    """The lines printed before a run: this machine, then each step's expected minutes and the total."""
    lines = [f"This machine: {machine['cores']} cores, torch kernels {machine['torch_capability']}, "
             f"{speed_ratio(machine):.2f}x the reference machine's time ({REFERENCE['machine']})."]
    width = max(map(len, expected))
    lines += [f"  {step:<{width}}  ~{seconds / 60:.1f} min" for step, seconds in expected.items()]
    lines.append(f"  {'total':<{width}}  ~{sum(expected.values()) / 60:.1f} min (expected on this machine)")
    return lines
