"""Short-schedule nnU-Net trainers for the CPU demo and the tests.

The demo trains on 2 CPU cores in minutes, so these trainers change nnU-Net's defaults
(1000 epochs x 250 iterations, SGD lr 1e-2, full augmentation) to:

* **few iterations**: ``EPOCHS x ITERATIONS`` set per class (without a budget; with one, the
  epochs stay and the iterations follow the CPU, see below); a handful of validation iterations
  per epoch, enough for the pseudo-Dice curve in the checkpoint logging;
* **AdamW with a polynomial decay** (lr ``LR``, nnU-Net's weight decay): with few iterations SGD
  at 1e-2 learned nothing in our measurements;
* **no data augmentation and no test-time mirroring** (nnU-Net's ``nnUNetTrainerNoDA``): the
  default scaling by 0.7-1.4 destroys the size cue that helps tell vertebrae apart, and mirroring
  multiplies prediction time;
* **foreground oversampling** ``OVERSAMPLE`` (fraction of each batch centred on a labelled
  voxel): small lesions are rare in a random patch;
* **progress.png drawn every ``SAVE_EVERY`` epochs** and at the end, not every epoch;
* **no end-of-training validation on fold 'all'**, where the "validation" cases are the
  training cases (nnU-Net would predict them all with its sliding window);
* **a fixed number of iterations** by default, ``EPOCHS x ITERATIONS``, the same on every machine,
  so that every CPU ends with the same model up to floating-point differences;
  ``spinemets_training.json`` in the fold's folder records what was reached (iterations, seconds,
  seconds per iteration, the CPU, the seed), renewed after every epoch, and the log says after each
  epoch how many iterations are done and how many minutes are left at the measured speed;
* **deterministic with a seed** (``SPINEMETS_TRAIN_SEED``, set by :func:`spinemets.training.nnunet.train`
  from the profile's ``seed``): the network's initial weights come from the seed, and the batches of
  each epoch from the seed and the epoch (numpy, torch and ``random`` are seeded at the start of
  every epoch, so a resumed run draws what an uninterrupted one would). nnU-Net's augmentation
  worker processes are not seeded (``NonDetMultiThreadedAugmenter``, ``seeds=None``); with a seed the
  data loader runs in the training process instead (nnU-Net's own ``nnUNet_n_proc_DA=0`` path, a
  ``SingleThreadedAugmenter``), which for the demo's in-memory cases without augmentation costs a
  few milliseconds per batch. Two runs on one machine then give the same weights bit for bit;
* **a wall-clock budget only when asked** (``SPINEMETS_TRAIN_BUDGET_S``, set by
  :func:`spinemets.training.nnunet.train` from ``--train-budget``): the number of epochs stays ``EPOCHS`` (so the polynomial learning
  rate, stepped per epoch, runs its whole course), and the iterations of each epoch are set from the
  measured cost of the epochs before, so that training ends near the budget on any CPU. A fast CPU
  gets more iterations, a slow one fewer, so the model, and the numbers, then depend on the CPU
  (the training record says ``budget_s``, and the results page says that the run used a budget);
* **channels-last 3-D weights on the CPU** (oneDNN's faster convolution layout here: 12 % per
  iteration for the vertebra network, 33 % for the lesion network on an AVX2 CPU); the checkpoints
  hold the same values, so inference is unchanged;
* **training cases kept in memory** (:class:`InMemoryCases`): nnU-Net's data loader opens and
  decompresses each sampled case for every patch; for the demo's small cases that was a quarter
  of the loader's time per batch, which on 2 cores is taken from the training threads. Each loader
  process reads a case once and keeps it, up to ``IN_MEMORY_BYTES``; the patches are the same;
* **CPU threads** from ``SPINEMETS_TORCH_THREADS`` when set (nnU-Net itself uses one per core):
  these small networks gain little from a second thread, so two stages can train side by side
  with one thread each (``threads`` of :class:`spinemets.training.nnunet.TrainingOptions`);
* **bfloat16 mixed precision on CPUs with bfloat16 matrix units** (AMX or AVX512-BF16, see
  :func:`cpu_bf16_supported`): nnU-Net autocasts on CUDA only; on such CPUs the network's forward
  pass runs under ``torch.autocast("cpu", bfloat16)`` (weights, optimizer and loss stay float32),
  about 1.6x faster per iteration on the demo's vertebra network. ``SPINEMETS_CPU_BF16=0`` turns it
  off, ``1`` forces it; elsewhere (e.g. a laptop CPU without them, where bfloat16 is emulated and
  slower) it stays off. Prediction always runs in float32.

Hyperparameters are class attributes, so a variant is a three-line subclass.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch
import numpy as np
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, nnUNetDatasetNumpy
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoDA import nnUNetTrainerNoDA


def cpu_bf16_supported() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX tiles or AVX512-BF16), per torch."""
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        return False
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


def use_cpu_bf16(device: torch.device, setting: str | None = None) -> bool:
    """bfloat16 autocast for training on this device: ``setting`` (default ``SPINEMETS_CPU_BF16``; 0/1, or
    ``auto``: :func:`cpu_bf16_supported`)."""
    if device.type != "cpu":
        return False
    setting = (os.environ.get("SPINEMETS_CPU_BF16", "auto") if setting is None else setting).strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    return cpu_bf16_supported()


#: What :class:`SpinemetsTrainer` writes into the fold's folder about the budget and what it reached.
TRAINING_RECORD = "spinemets_training.json"


def _setting(name: str, convert, valid, expected: str):
    """The value of environment variable ``name`` through ``convert``, or None when unset or empty;
    a ValueError naming the variable when it does not convert or ``valid`` refuses it."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        parsed = convert(value)
    except ValueError:
        parsed = None
    if parsed is None or not valid(parsed):
        raise ValueError(f"{name} must be {expected}, not {value!r}")
    return parsed


def budget_seconds() -> float | None:
    """The training budget in seconds from ``SPINEMETS_TRAIN_BUDGET_S``, or None (a fixed iteration count)."""
    return _setting("SPINEMETS_TRAIN_BUDGET_S", float, lambda v: math.isfinite(v) and v > 0,
                    "a positive number of seconds")


def training_seed() -> int | None:
    """The training seed from ``SPINEMETS_TRAIN_SEED``, or None (nnU-Net's unseeded behaviour)."""
    return _setting("SPINEMETS_TRAIN_SEED", int, lambda v: v >= 0, "a non-negative integer")


def seed_everything(seed: int, epoch: int | None = None) -> None:
    """Seed numpy's, torch's and Python's global generators from ``seed`` (and ``epoch``: one
    stream per epoch, so that an epoch draws the same batches whether or not the run was resumed)."""
    value = int(np.random.SeedSequence([int(seed)] + ([] if epoch is None else [int(epoch)])).generate_state(1)[0])
    np.random.seed(value)
    torch.manual_seed(value)
    random.seed(value)


@contextlib.contextmanager
def in_process_data_loading():
    """nnU-Net's data loader in the training process (``nnUNet_n_proc_DA=0``: its
    ``SingleThreadedAugmenter``) for the duration: batches drawn from the seeded global generators."""
    before = os.environ.get("nnUNet_n_proc_DA")
    os.environ["nnUNet_n_proc_DA"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("nnUNet_n_proc_DA", None)
        else:
            os.environ["nnUNet_n_proc_DA"] = before


def iterations_for(remaining_s: float, epochs_left: int, per_iteration_s: float, per_epoch_s: float,
                   cap: int) -> int:
    """Iterations for each of the next ``epochs_left`` epochs so that they end in ``remaining_s``.

    ``per_iteration_s``: measured cost of one training iteration; ``per_epoch_s``: the epoch's work
    besides its training iterations (validation, checkpoint, logging). At least 1, at most ``cap``.
    """
    if epochs_left <= 0:
        return 1
    share = remaining_s / epochs_left - per_epoch_s
    return int(min(cap, max(1, round(share / max(per_iteration_s, 1e-6)))))


def cpu_description() -> dict:
    """The CPU the training ran on: model name, core count, torch's kernel level, bf16 units."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"model": name, "cores": os.cpu_count(), "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_units": cpu_bf16_supported(), "threads": torch.get_num_threads()}


def autocast_forward(network: torch.nn.Module) -> None:
    """Run ``network``'s forward under CPU bfloat16 autocast and return float32 outputs.

    The bound ``forward`` is replaced on this instance only, so the parameters, the state dict
    (the checkpoints) and the class are unchanged.
    """
    inner = network.forward

    def forward(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = inner(*args, **kwargs)
        if isinstance(out, (list, tuple)):  # deep supervision: one output per resolution
            return type(out)(o.float() for o in out)
        return out.float()

    network.forward = forward


#: The most bytes of decompressed cases :class:`InMemoryCases` keeps per process (the demo's 28
#: cases take about 40 MB); cases beyond it are read from disk at every use, as nnU-Net does.
IN_MEMORY_BYTES = 1 << 30


class InMemoryCases:
    """Mixin for nnU-Net's preprocessed datasets: ``load_case`` reads a case once per process and
    then hands out copies of the arrays kept in memory (so that nothing downstream can change the
    kept ones), up to :data:`IN_MEMORY_BYTES`; beyond it, cases are read as by the base class."""

    def load_case(self, identifier):
        kept = self.__dict__.setdefault("_spinemets_kept", {})
        if identifier not in kept:
            data, seg, seg_prev, properties = super().load_case(identifier)
            arrays = tuple(None if a is None else np.asarray(a[...]) for a in (data, seg, seg_prev))
            used = sum(a.nbytes for case in kept.values() for a in case[:3] if a is not None)
            if used + sum(a.nbytes for a in arrays if a is not None) > IN_MEMORY_BYTES:
                return (*arrays, properties)
            kept[identifier] = (*arrays, properties)
        data, seg, seg_prev, properties = kept[identifier]
        return data.copy(), seg.copy(), None if seg_prev is None else seg_prev.copy(), properties


class InMemoryBlosc2(InMemoryCases, nnUNetDatasetBlosc2):
    """nnU-Net's blosc2 dataset with its cases kept in memory (:class:`InMemoryCases`)."""


class InMemoryNumpy(InMemoryCases, nnUNetDatasetNumpy):
    """nnU-Net's numpy dataset with its cases kept in memory (:class:`InMemoryCases`)."""


#: nnU-Net's dataset classes and their in-memory versions (module-level classes, so that a data
#: loader's worker started with ``spawn`` can unpickle them).
IN_MEMORY = {nnUNetDatasetBlosc2: InMemoryBlosc2, nnUNetDatasetNumpy: InMemoryNumpy}


class SpinemetsTrainer(nnUNetTrainerNoDA):
    """Base of the short-schedule trainers (see the module docstring)."""

    EPOCHS = 20
    ITERATIONS = 25
    VAL_ITERATIONS = 3
    LR = 3e-3
    OVERSAMPLE = 0.33
    SAVE_EVERY = 5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        threads = os.environ.get("SPINEMETS_TORCH_THREADS")
        if threads and self.device.type == "cpu":
            torch.set_num_threads(int(threads))  # nnU-Net sets one thread per core before this
        self.num_epochs = self.EPOCHS
        self.num_iterations_per_epoch = self.ITERATIONS
        self.num_val_iterations_per_epoch = self.VAL_ITERATIONS
        self.initial_lr = self.LR
        self.oversample_foreground_percent = self.OVERSAMPLE
        self.save_every = self.SAVE_EVERY
        self.budget_s = budget_seconds()
        self.seed = training_seed()
        self._epoch_costs: list[tuple[int, float, float]] = []  # (iterations, training s, other s) per epoch
        self._epoch_log_before: list[tuple[int, float]] = []  # (iterations, s) of the epochs before a resume

    def initialize(self):
        if self.seed is not None:
            seed_everything(self.seed)  # the network's initial weights
        super().initialize()
        plot = self.logger.plot_progress_png

        def plot_now_and_then(output_folder):  # nnU-Net redraws progress.png every epoch: ~5 % of a demo epoch
            if (self.current_epoch + 1) % self.save_every == 0 or self.current_epoch + 1 >= self.num_epochs:
                plot(output_folder)

        self.logger.plot_progress_png = plot_now_and_then
        self.dataset_class = IN_MEMORY.get(self.dataset_class, self.dataset_class)
        if self.device.type == "cpu":
            layout = torch.channels_last_3d if len(self.configuration_manager.patch_size) == 3 else torch.channels_last
            self.network.to(memory_format=layout)  # in place: the optimizer keeps its parameters
        self.bf16 = use_cpu_bf16(self.device)
        if self.bf16:
            autocast_forward(self.network)
            self.print_to_log_file("CPU bfloat16 autocast for the forward pass (float32 weights and loss)")

    def get_dataloaders(self):
        if self.seed is None:
            return super().get_dataloaders()
        with in_process_data_loading():  # nnU-Net's worker processes are not seeded
            return super().get_dataloaders()

    # -- the wall-clock budget ------------------------------------------------------------------

    def on_train_start(self):
        super().on_train_start()
        self._t0 = time.monotonic()
        self._cpu = cpu_description()
        record = self._read_record()
        if record and self.current_epoch > 0:  # resumed: the epochs before the checkpoint count
            # the record is renewed every epoch, the checkpoint every few: the epochs after it are trained again
            self._epoch_log_before = [tuple(e) for e in record.get("epoch_log", [])[:self.current_epoch]]
        if self.budget_s is not None and self.is_ddp:
            # each process would fit its own iteration count and the gradient all-reduce would wait forever
            self.print_to_log_file("Training budget ignored with several GPUs (DDP): the trainer's own iteration count")
            self.budget_s = None
        if self.budget_s is not None:
            # until an epoch has been measured, a fifth of the class's iterations per epoch
            self.num_iterations_per_epoch = max(2, self.ITERATIONS // 5)
            self.print_to_log_file(f"Training budget {self.budget_s:.0f} s over {self.num_epochs} epochs: the "
                                   "iterations per epoch follow the measured cost of this CPU")

    def on_train_epoch_start(self):
        self._epoch_t0 = time.monotonic()
        if self.seed is not None:
            seed_everything(self.seed, self.current_epoch)  # this epoch's batches, resumed or not
        super().on_train_epoch_start()

    def on_train_epoch_end(self, train_outputs):
        self._train_s = time.monotonic() - self._epoch_t0
        self._train_n = len(train_outputs)
        super().on_train_epoch_end(train_outputs)

    def on_epoch_end(self):
        super().on_epoch_end()
        total = time.monotonic() - self._epoch_t0
        self._epoch_costs.append((self._train_n, self._train_s, max(0.0, total - self._train_s)))
        elapsed = sum(seconds for _, seconds in self._epoch_log_before) + time.monotonic() - self._t0
        left = self.num_epochs - self.current_epoch
        per_it, per_epoch = self._costs()
        if self.budget_s is not None and left > 0:
            self.num_iterations_per_epoch = iterations_for(self.budget_s - elapsed, left, per_it, per_epoch,
                                                           cap=20 * self.ITERATIONS)
        eta = left * (self.num_iterations_per_epoch * per_it + per_epoch)
        done = sum(n for n, _ in self._epoch_log_before) + sum(n for n, _, _ in self._epoch_costs)
        planned = done + left * self.num_iterations_per_epoch
        self.print_to_log_file(f"spinemets: epoch {self.current_epoch}/{self.num_epochs}, iterations {done}/{planned}, "
                               f"{elapsed:.0f} s, {per_it:.2f} s per iteration; about {eta / 60:.1f} min left")
        self._write_record(elapsed, done=left <= 0)
        self._keep_checkpoint(done)

    def _keep_checkpoint(self, iterations: int) -> None:
        """With ``SPINEMETS_KEEP_CHECKPOINTS_EVERY=N`` (epochs; the learning-curve benchmark), a copy of
        the weights after every N-th epoch, ``checkpoint_it{iterations}.pth``."""
        every = int(os.environ.get("SPINEMETS_KEEP_CHECKPOINTS_EVERY", "0") or 0)
        if every > 0 and self.current_epoch % every == 0 and self.local_rank == 0:
            self.save_checkpoint(str(Path(self.output_folder) / f"checkpoint_it{iterations}.pth"))

    def _costs(self) -> tuple[float, float]:
        """Seconds per training iteration and per epoch's other work: medians, the first epoch (warm-up) left out."""
        costs = self._epoch_costs[1:] or self._epoch_costs
        per_it = statistics.median(s / max(n, 1) for n, s, _ in costs)
        per_epoch = statistics.median(o for _, _, o in costs)
        return per_it, per_epoch

    def _read_record(self) -> dict | None:
        try:
            return json.loads((Path(self.output_folder) / TRAINING_RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _write_record(self, elapsed: float, done: bool) -> None:
        if self.local_rank != 0:
            return
        per_it, per_epoch = self._costs()
        # (iterations, seconds) per epoch: a resumed run counts the epochs its checkpoint holds
        epoch_log = [list(e) for e in self._epoch_log_before] + [[n, round(t + o, 2)] for n, t, o in self._epoch_costs]
        record = {"trainer": type(self).__name__, "budget_s": self.budget_s, "finished": done,
                  "epochs": self.current_epoch, "epochs_planned": self.num_epochs,
                  "iterations": int(sum(n for n, _ in epoch_log)),
                  "iterations_planned": None if self.budget_s is not None else self.EPOCHS * self.ITERATIONS,
                  "seed": self.seed, "data_loading": "in-process" if self.seed is not None else "worker processes",
                  "elapsed_s": round(elapsed, 1), "seconds_per_iteration": round(per_it, 4),
                  "seconds_per_epoch_other": round(per_epoch, 3), "batch_size": self.batch_size,
                  "patch_size": list(self.configuration_manager.patch_size), "bf16_autocast": self.bf16,
                  "channels_last": self.device.type == "cpu", "device": self.device.type,
                  "cpu": self._cpu, "torch": torch.__version__, "epoch_log": epoch_log}
        path = Path(self.output_folder) / TRAINING_RECORD
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        scheduler = PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)
        return optimizer, scheduler

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self.fold == "all":
            self.print_to_log_file("Final validation skipped: on fold 'all' the validation cases are the training cases.")
            return
        super().perform_actual_validation(save_probabilities)


class SpinemetsVertebraeDemoTrainer(SpinemetsTrainer):
    """Vertebra stage of the CPU demo: 25 classes whose identity needs many iterations.

    ``EPOCHS x ITERATIONS`` = 1000 iterations on every CPU. With the network at half the features
    per stage (2.3 times cheaper per iteration), 700 iterations had not yet left the all-background
    start (pseudo-Dice 0.001): the width stays. On 12 held-out synthetic cases (per-vertebra Dice,
    before the fragment clean-up of inference), 800 iterations at lr 3e-3 gave 0.64, 700 at 6e-3
    gave 0.69, and 600 at 8e-3 only 0.29; on the 8 held-out cases of the budgeted demo, 467
    iterations gave 0.31 and 963 gave 0.73 (identification rate 0.93; ``bench_budget_vertebrae.md``).
    The learning curve of this schedule: ``benchmarks/bench_demo_learning.py``.
    """

    EPOCHS = 20
    ITERATIONS = 50
    LR = 6e-3
    OVERSAMPLE = 0.33


class SpinemetsMetastasesDemoTrainer(SpinemetsTrainer):
    """Metastasis stage of the CPU demo: half of each batch centred on a lesion voxel (1800 iterations
    on every CPU; with an opt-in budget, as many as fit).

    With every patch centred on a lesion (oversampling 1.0) the network saw too little lesion-free
    bone and predicted many small false positives on held-out cases; 0.5 roughly halved them.
    On 12 held-out cases, pooled lytic / sclerotic Dice was 0.40 / 0.44 after 600 iterations,
    0.47 / 0.48 after 600 at lr 1e-2, and 0.54 / 0.61 after 1200: it needs iterations more than rate.
    On the demo's 16 held-out cases (with the demo's clean-up), 900 iterations gave lesion-level F2
    0.53 (lytic) and 0.69 (sclerotic) with 0.8 false-positive lesions per case; this schedule of 1800
    gave 0.78 and 0.85 with 0.3, at a fifth of a vertebra iteration's cost each
    (``benchmarks/results/bench_demo_learning_metastases.csv``).
    """

    EPOCHS = 72
    ITERATIONS = 25
    LR = 3e-3
    OVERSAMPLE = 0.5


class SpinemetsCITrainer(SpinemetsTrainer):
    """A few iterations, a checkpoint every epoch: exercises the whole pipeline in seconds (tests)."""

    EPOCHS = 3
    ITERATIONS = 2
    VAL_ITERATIONS = 1
    LR = 3e-3
    OVERSAMPLE = 0.5
    SAVE_EVERY = 1


class SpinemetsSmokeTrainer(nnUNetTrainer):
    """nnU-Net's default training, unchanged but for its length: the ``smoke`` profile's trainer.

    SGD with Nesterov momentum and the polynomial learning rate, the full data augmentation, deep
    supervision, the final validation and (with ``--npz``) the softmax export, the
    ``3d_lowres`` export of its validation predictions for the cascade: all nnU-Net's own code. Only
    the number of epochs and of iterations per epoch are small: ``EPOCHS`` x ``ITERATIONS`` (class
    attributes), overridden by the environment variables ``SPINEMETS_<ENV>_EPOCHS`` and
    ``SPINEMETS_<ENV>_ITERATIONS``. A checkpoint is written after every epoch, so that a killed
    fold resumes (``nnUNetv2_train --c``) from its last epoch.

    The final validation (nnU-Net's sliding-window prediction of every validation case, exported
    as segmentations and, with ``--npz``, probabilities) runs without test-time mirroring when
    ``VALIDATION_MIRRORING`` is False: on a CPU, mirroring multiplies its cost by 8 (3D) or 4 (2D)
    and was most of a fold's time, while the code that runs is the same. The checkpoints keep
    nnU-Net's mirroring axes (they are written before the validation), so inference is unaffected.
    On fold 'all' the validation is skipped, as in :class:`SpinemetsTrainer`.
    """

    ENV = "SMOKE"
    EPOCHS = 2
    ITERATIONS = 3
    VALIDATION_MIRRORING = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get(f"SPINEMETS_{self.ENV}_EPOCHS", self.EPOCHS))
        self.num_iterations_per_epoch = int(os.environ.get(f"SPINEMETS_{self.ENV}_ITERATIONS", self.ITERATIONS))
        self.num_val_iterations_per_epoch = max(1, self.num_iterations_per_epoch // 10)
        self.save_every = 1

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self.fold == "all":
            self.print_to_log_file("Final validation skipped: on fold 'all' the validation cases are the training cases.")
            return
        axes = self.inference_allowed_mirroring_axes
        if not self.VALIDATION_MIRRORING:
            self.inference_allowed_mirroring_axes = None
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.inference_allowed_mirroring_axes = axes


class SpinemetsGPUCheckTrainer(SpinemetsSmokeTrainer):
    """The smoke trainer with GPU-sized defaults (``scripts/gpu_check.sh``): 3 epochs of 250 iterations,
    and the final validation with mirroring, as nnU-Net's own.

    ``SPINEMETS_GPU_CHECK_EPOCHS`` and ``SPINEMETS_GPU_CHECK_ITERATIONS`` set them, so that the
    script can fit its time budget and be dry-run on a CPU with 2 iterations.
    """

    ENV = "GPU_CHECK"
    EPOCHS = 3
    ITERATIONS = 250
    VALIDATION_MIRRORING = True  # nnU-Net's own validation: cheap on a GPU
