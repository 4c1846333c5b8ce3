"""How long a run will take on this machine, said before it starts.

:func:`measure_machine` times two small fixed workloads for a few seconds: a 3-D convolution
network's forward and backward pass in torch (what training and inference spend their time on)
and array work in NumPy/SciPy (synthesis, import, resampling, metrics). Their times against the
same workloads on the reference machine (:data:`REFERENCE`, a 2-core AVX2 CPU without bfloat16
units, where the step times were measured in a demo run) scale each step's reference time: the
steps other than training, and the planning and preprocessing around each training.

Training itself is timed, not scaled: :func:`time_training_iterations` builds each stage's network
as the stage's plans configuration does (nnU-Net's own network, loss with deep supervision, and
the trainer's AdamW, channels-last layout and bfloat16 autocast where the trainer uses it) and
times a few real training iterations and validation passes of it on this machine. A stage that
trains a fixed number of iterations (the demo) is then expected to take those iterations times
the measured seconds, times :data:`LOOP_FACTOR` for nnU-Net's loop around the network (data
loading, logging); a stage with a wall-clock budget (``--train-budget``) takes its budget.

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
            # 28.0 and 60.0 s measured with 28 cases, 8 held out; scaled (not measured again) to the
            # 40 cases, 16 held out of the demo now
            "02_slicer": 40.0,
            "03_training_vertebrae": 45.0,
            "03_training_metastases": 40.0,
            "04_inference": 120.0,
            "05_metrics": 6.0,
            "06_external": 22.0,
            "book": 15.0,
        },
    },
}


#: nnU-Net's training loop against the bare training step that :func:`time_training_iterations`
#: times (the same network, loss and optimizer on random tensors): data loading, copies, the epoch's
#: logging and checkpoint. ``benchmarks/bench_train.py`` measured nnU-Net's iteration over that step
#: at 1.02-1.28x for the vertebra network and 0.93-1.22x for the lesion network (Intel Xeon native,
#: bfloat16 off and AVX2 emulation; AMD EPYC AVX2), with the loader in a worker process; the seeded
#: demo loads its batches in the training process, 0.008-0.033 s per batch in those measurements.
LOOP_FACTOR = 1.25


def network_for(spec: Mapping, classes: int):
    """The U-Net a plans configuration of :data:`spinemets.training.profiles.DEMO_CONFIGURATIONS` gets, built by
    nnU-Net (``get_network_from_plans``) with the architecture :func:`spinemets.training.nnunet.add_configuration`
    writes over nnU-Net's ``3d_fullres`` plan: kernels 3, two convolutions per stage in the encoder
    and the decoder, instance norm, leaky ReLU, deep supervision; one input channel."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    n = len(spec["features_per_stage"])
    kwargs = {"n_stages": n, "features_per_stage": list(spec["features_per_stage"]),
              "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * n,
              "strides": [list(s) for s in spec["strides"]], "n_conv_per_stage": [2] * n,
              "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
              "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
              "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
              "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    return get_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet", kwargs,
                                  ["conv_op", "norm_op", "dropout_op", "nonlin"], 1, classes,
                                  allow_init=True, deep_supervision=True)


def time_training_iterations(spec: Mapping, classes: int, iterations: int = 3, seed: int = 0,
                             bf16_setting: str | None = None) -> dict:
    """Seconds per training iteration and per validation iteration of one stage's network on this CPU.

    ``spec``: a plans configuration of :data:`spinemets.training.profiles.DEMO_CONFIGURATIONS` (patch, features,
    strides, batch size); ``classes``: the stage's output channels (background included). A training
    iteration is what the project's trainers run per batch: forward (under CPU bfloat16 autocast
    where :func:`~spinemets.training.trainers.spinemets_trainers.use_cpu_bf16` says so), nnU-Net's Dice +
    cross-entropy loss over the deep-supervision outputs, backward, gradient clipping and an AdamW
    step, channels-last 3-D weights; a validation iteration is the forward pass and loss without
    gradients. One warm-up iteration, then the median of ``iterations``. ``bf16_setting``: the trainers'
    bfloat16 setting (:func:`spinemets.training.profiles.cpu_bf16_setting`; default: the environment's).
    """
    import torch
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    from spinemets.training.trainers.spinemets_trainers import autocast_forward, use_cpu_bf16

    generator = torch.Generator().manual_seed(seed)
    network = network_for(spec, classes).to(memory_format=torch.channels_last_3d)
    bf16 = use_cpu_bf16(torch.device("cpu"), bf16_setting)
    if bf16:
        autocast_forward(network)
    n_outputs = len(spec["features_per_stage"]) - 1
    weights = np.array([1 / (2 ** i) for i in range(n_outputs)])
    weights[-1] = 0
    loss = DeepSupervisionWrapper(DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False},
                                                 {}, weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss),
                                  weights / weights.sum())
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=3e-5)
    batch = int(spec.get("batch_size", 2))
    x = torch.randn(batch, 1, *spec["patch_size"], generator=generator)
    with torch.no_grad():
        shapes = [o.shape[2:] for o in network(x)]
    targets = [torch.randint(0, classes, (batch, 1, *shape), generator=generator).float() for shape in shapes]

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        value = loss(network(x), targets)
        value.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
        optimizer.step()

    def val_step():
        with torch.no_grad():
            loss(network(x), targets)

    network.train()
    return {"seconds_per_iteration": _median_time(train_step, 0.0, iterations),
            "seconds_per_val_iteration": _median_time(val_step, 0.0, iterations),
            "timed_iterations": iterations, "bf16_autocast": bf16}


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


def _median_time(step, seconds: float, at_least: int = 3) -> float:
    step()  # warm-up: first calls allocate and pick kernels
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < at_least:
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


def has_reference(profile_name: str, steps: Sequence[str], training: Mapping[str, object]) -> bool:
    """Whether :func:`estimate_run` can estimate these steps: the profile has reference times for
    each, and each training step (a key of ``training``) has a budget or timed iterations."""
    reference = REFERENCE["steps"].get(profile_name)
    return (reference is not None and all(step in reference for step in steps)
            and all(training[step] for step in steps if step in training))


def training_seconds(work) -> float:
    """Expected seconds of one stage's training: a wall-clock budget (a number), or fixed work (a
    dict: ``iterations`` x ``seconds_per_iteration`` x :data:`LOOP_FACTOR`, plus ``epochs`` x
    ``val_iterations`` x ``seconds_per_val_iteration``)."""
    if isinstance(work, Mapping):
        return (float(work["iterations"]) * float(work["seconds_per_iteration"]) * LOOP_FACTOR
                + float(work.get("epochs", 0)) * float(work.get("val_iterations", 0))
                * float(work.get("seconds_per_val_iteration", 0.0)))
    return float(work)


def estimate_run(profile_name: str, steps: Sequence[str], training: Mapping[str, object],
                 machine: Mapping, book: bool = True) -> dict[str, float] | None:
    """Expected seconds per step (and ``book``) of a run, or None when the profile has no reference times.

    ``steps``: the run's step names (``01_dataset``, ``03_training_vertebrae``, ...); ``training``:
    per training step, its wall-clock budget in seconds, or its fixed work with the measured speed
    (:func:`training_seconds`), or None (such a run has no estimate). The reference time of a
    training step (planning, preprocessing) is scaled by :func:`speed_ratio`; its training is added.
    """
    if not has_reference(profile_name, steps, training):
        return None
    reference = REFERENCE["steps"][profile_name]
    ratio = speed_ratio(machine)
    out = {step: reference[step] * ratio + (training_seconds(training[step]) if step in training else 0.0)
           for step in steps}
    if book:
        out["book"] = reference["book"] * ratio
    return out


def format_estimate(expected: Mapping[str, float], machine: Mapping, training: Mapping[str, object] | None = None) -> list[str]:
    """The lines printed before a run: this machine, the timed training speed per training step
    (``training`` as given to :func:`estimate_run`), then each step's expected minutes and the total."""
    lines = [f"This machine: {machine['cores']} cores, torch kernels {machine['torch_capability']}, "
             f"{speed_ratio(machine):.2f}x the reference machine's time ({REFERENCE['machine']})."]
    for step, work in (training or {}).items():
        if isinstance(work, Mapping):
            lines.append(f"  {step}: {work['iterations']} training iterations at {work['seconds_per_iteration']:.2f} s "
                         f"(timed here: {work.get('timed_iterations', '?')} iterations of its network, bfloat16 "
                         f"autocast {'on' if work.get('bf16_autocast') else 'off'})")
        elif work:
            lines.append(f"  {step}: a time budget of {float(work) / 60:.1f} min (--train-budget)")
    width = max(map(len, expected))
    lines += [f"  {step:<{width}}  ~{seconds / 60:.1f} min" for step, seconds in expected.items()]
    lines.append(f"  {'total':<{width}}  ~{sum(expected.values()) / 60:.1f} min (expected on this machine)")
    return lines
