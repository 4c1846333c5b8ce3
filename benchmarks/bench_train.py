"""One training iteration of each demo stage inside nnU-Net, as a ratio to the floor measured in the same run.

**Setup** (once; in a temporary folder, or in ``--workdir``, where it is reused when present): a
small synthetic cohort (:func:`spinemets.cohort.synth.synthesize_cohort`, ``demo`` preset), imported into
the workspace's nnU-Net raw datasets of both stages (:func:`spinemets.cohort.dataset.scan`,
:func:`spinemets.cohort.dataset.import_dataset`), then :func:`spinemets.training.nnunet.plan_and_preprocess` for
the ``demo`` profile, which preprocesses the configurations ``demo_vertebrae`` and
``demo_metastases``.

**Measurement** (one fresh Python process per mode, so that ISA settings apply before torch loads;
the process gets the workspace's nnU-Net variables and the demo's CPU environment,
:func:`spinemets.training.programs.cpu_environment`, with ``nnUNet_results`` pointed at a temporary folder so
that no trained model is touched). Per stage, the stage's demo trainer is built in-process
(``SpinemetsVertebraeDemoTrainer`` / ``SpinemetsMetastasesDemoTrainer``, fold ``all``, CPU, torch
threads as ``nnUNetv2_train`` sets them), ``initialize()`` and ``on_train_start()``, then:

* **nnU-Net iteration**: ``trainer.train_step(next(trainer.dataloader_train))`` after 2 warm-up
  iterations; the part spent blocked in ``next()`` (waiting for nnU-Net's data-loading worker) is
  reported as ``wait``;
* **floor**, in the same rounds (one nnU-Net iteration, one floor step, one fixed-batch step per
  round, so that load from elsewhere on a shared machine hits them alike): the trainer's own network
  object (so whatever memory format and bfloat16 autocast its ``initialize`` set up), its loss and
  its optimizer on a random batch of the same shape (random targets at each deep-supervision
  output's shape and dtype): ``zero_grad``, forward, loss, backward, ``optimizer.step()``; no data
  loading, no nnU-Net loop. ``step`` is the trainer's own ``train_step`` on that fixed batch (the
  floor plus nnU-Net's gradient clipping and copies), so that ``step - floor`` is what the step adds
  and ``iteration - step`` what the data pipeline adds. Times are medians over the rounds; the
  ratio is the median of the per-round ratios iteration / floor;
* **per-epoch work**: the trainer's validation steps (``VAL_ITERATIONS`` x ``validation_step``) and
  the epoch end (``on_train_epoch_end``, ``on_validation_epoch_end``, ``on_epoch_end``: logging and
  the first ``checkpoint_best.pth``), and one ``progress.png`` (drawn every ``SAVE_EVERY`` epochs),
  spread over the epoch's iterations (``epoch/it``);
* then the data loaders are shut down (``on_train_end``: no worker process is left), and
* **data**: one batch of nnU-Net's training data loader computed in-process (``next`` on the
  loader behind the worker), with no worker running: the CPU time the worker spends per batch,
  which on a small machine competes with the training threads.

**FLOPs** of one forward + backward are counted with ``torch.utils.flop_counter.FlopCounterMode``;
the machine's dense-convolution throughput is a float32 Conv3d 64 -> 64, 3x3x3, on 2x64x32x32x32,
forward + backward, for a few seconds; efficiency = achieved GFLOP/s / dense GFLOP/s.

**Modes** (``--modes``; default all): ``native`` (as is), ``bf16-off`` (``SPINEMETS_CPU_BF16=0``),
``bf16-on`` (``SPINEMETS_CPU_BF16=1``), ``avx2`` (``SPINEMETS_CPU_BF16=0 ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2``), ``passive`` (``OMP_WAIT_POLICY=PASSIVE``, the policy of the profiles
that may train side by side, against the demo's ``ACTIVE``). On a CPU without bfloat16 units (AVX2 only) ``bf16-on`` is emulated
(slow) and ``avx2`` equals ``native``.

Goal: nnU-Net iteration <= 1.15x the floor. Times are wall-clock on a possibly shared machine:
noisy; the ratios, measured in the same process minutes apart, are what count. Tests never assert
times.

    .venv/bin/python benchmarks/bench_train.py [--quick] [--modes native,bf16-off] [--iterations 10]
        [--workdir DIR] [--out benchmarks/results/bench_train_<cpu>.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from spinemets.paths import PLANS, Workspace
from spinemets.training.profiles import get_profile
from spinemets.training.programs import cpu_environment

STAGES = ("vertebrae", "metastases")
PROFILE = "demo"
MODES: dict[str, dict[str, str]] = {
    "native": {},
    "bf16-off": {"SPINEMETS_CPU_BF16": "0"},
    "bf16-on": {"SPINEMETS_CPU_BF16": "1"},
    "avx2": {"SPINEMETS_CPU_BF16": "0", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    # the OpenMP wait policy of the profiles that may train side by side (ci, smoke, paper), for comparison
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
}
GOAL = 1.15
RESULT_KEY = "bench_train"


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Setup (parent process; no torch)
# --------------------------------------------------------------------------------------------


def setup(workdir: Path, cases: int, seed: int) -> dict:
    """Cohort -> raw datasets -> plans and preprocessed demo configurations; each step skipped when done."""
    from spinemets.cohort import dataset, synth
    from spinemets.training import nnunet

    ws = Workspace(workdir / "workspace")
    cohort = workdir / "cohort"
    seconds = {}
    t0 = time.perf_counter()
    if not (cohort / "cohort.csv").is_file():
        log(f"setup: synthesizing {cases} {PROFILE} cases in {cohort}")
        synth.synthesize_cohort(cohort, cases=cases, seed=seed, preset="demo", jobs=min(2, os.cpu_count() or 1))
    seconds["synth"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    manifest = None
    for stage in STAGES:
        if not (ws.raw / ws.dataset_name(stage) / "dataset.json").is_file():
            if manifest is None:
                manifest = dataset.scan(cohort)
            log(f"setup: importing the {stage} raw dataset")
            dataset.import_dataset(manifest, stage, ws.raw)
    seconds["import"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for stage in STAGES:
        log(f"setup: planning and preprocessing {stage} ({PROFILE})")
        with contextlib.redirect_stdout(sys.stderr):
            nnunet.plan_and_preprocess(stage, PROFILE, workspace=ws, processes=min(2, os.cpu_count() or 1))
    seconds["plan_and_preprocess"] = time.perf_counter() - t0
    return {"workspace": ws, "seconds": {k: round(v, 1) for k, v in seconds.items()}}


# --------------------------------------------------------------------------------------------
# Worker (fresh process per mode)
# --------------------------------------------------------------------------------------------


def _median(times: list[float]) -> float:
    return float(statistics.median(times)) if times else float("nan")


def dense_conv_gflops(seconds: float) -> dict:
    """float32 Conv3d 64->64, 3x3x3, input 2x64x32x32x32, forward + backward: GFLOP/s of this machine."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(64, 64, 3, padding=1)
    x = torch.randn(2, 64, 32, 32, 32, requires_grad=True)

    def step():
        conv.zero_grad(set_to_none=True)
        x.grad = None
        conv(x).sum().backward()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    step()  # warm-up
    times, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds or len(times) < 3:
        s0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - s0)
    best = min(times)  # the machine's throughput: its best iteration (the machine may be shared)
    return {"gflop_per_iteration": flops / 1e9, "best_s": best, "median_s": _median(times), "gflops": flops / best / 1e9}


def _trainer_class(stage: str):
    from spinemets.training.profiles import stage_plan
    from spinemets.training.trainers import spinemets_trainers

    return getattr(spinemets_trainers, stage_plan(stage, PROFILE)["trainer"])


def _uses_channels_last(network) -> bool:
    import torch

    for p in network.parameters():
        if p.dim() == 5:
            return p.is_contiguous(memory_format=torch.channels_last_3d) and not p.is_contiguous()
    return False


def _floor(trainer, real_batch: dict, channels_last: bool, bf16: bool):
    """The floor step: the trainer's network, loss and optimizer on a random batch shaped like ``real_batch``.

    Returns (step function, the random batch as a dict for ``train_step``, whether autocast is added
    around the forward here: only when the trainer autocasts but not inside the network's own forward).
    """
    import torch

    torch.manual_seed(0)
    data = torch.randn(real_batch["data"].shape, dtype=torch.float32)
    targets = real_batch["target"]
    n_classes = trainer.label_manager.num_segmentation_heads
    if isinstance(targets, (list, tuple)):  # deep supervision: one target per output resolution
        targets = [torch.randint(0, n_classes, t.shape, dtype=t.dtype) for t in targets]
    else:
        targets = torch.randint(0, n_classes, targets.shape, dtype=targets.dtype)
    if channels_last:
        data = data.contiguous(memory_format=torch.channels_last_3d)
    network, loss, optimizer = trainer.network, trainer.loss, trainer.optimizer
    outer_autocast = bf16 and "forward" not in vars(network)

    def floor_step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16) if outer_autocast else contextlib.nullcontext():
            value = loss(network(data), targets)
        value.backward()
        optimizer.step()

    return floor_step, {"data": data, "target": targets}, outer_autocast


def measure_stage(stage: str, iterations: int, warmup: int) -> dict:
    """Time the stage's demo trainer's iteration, per-epoch work, floor and data loading (see the module docstring)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from spinemets.fileio import read_json

    ws = Workspace(os.environ["SPINEMETS_BENCH_WORKSPACE"])
    configuration = f"{PROFILE}_{stage}"
    folder = ws.preprocessed / ws.dataset_name(stage)
    plans = read_json(folder / f"{PLANS}.json", "nnU-Net plans")
    plans["continue_training"] = False  # what nnU-Net's get_trainer_from_args adds for its trainers
    dataset_json = read_json(folder / "dataset.json", "nnU-Net dataset")
    cls = _trainer_class(stage)
    out: dict = {"stage": stage, "trainer": cls.__name__, "configuration": configuration}

    trainer = cls(plans, configuration, "all", dataset_json, device=torch.device("cpu"))
    trainer.initialize()
    out["bf16_autocast"] = bool(getattr(trainer, "bf16", False))
    out["channels_last_3d"] = _uses_channels_last(trainer.network)
    out["threads"] = torch.get_num_threads()
    out["batch_size"] = int(trainer.batch_size)
    out["patch_size"] = list(trainer.configuration_manager.patch_size)
    out["iterations_per_epoch"] = int(trainer.num_iterations_per_epoch)
    out["val_iterations_per_epoch"] = int(trainer.num_val_iterations_per_epoch)
    out["save_every"] = int(trainer.save_every)
    out["parameters"] = sum(p.numel() for p in trainer.network.parameters())

    t0 = time.perf_counter()
    trainer.on_train_start()  # data loaders (with nnU-Net's worker processes), unpacking, plans copies, debug.json
    out["on_train_start_s"] = time.perf_counter() - t0
    real_batch = None
    try:
        # --- nnU-Net iteration, as run_training does it, interleaved with the floor and the fixed-batch step
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        train_outputs = []
        for _ in range(warmup):
            real_batch = next(trainer.dataloader_train)
            train_outputs.append(trainer.train_step(real_batch))
        floor_step, fixed, outer_autocast = _floor(trainer, real_batch, out["channels_last_3d"], out["bf16_autocast"])
        out["floor_outer_autocast"] = outer_autocast
        for _ in range(warmup):
            floor_step()
            trainer.train_step(fixed)
        iteration, wait, floor, step = [], [], [], []
        for _ in range(iterations):  # one of each per round: load from elsewhere on the machine hits all alike
            t0 = time.perf_counter()
            batch = next(trainer.dataloader_train)
            t1 = time.perf_counter()
            train_outputs.append(trainer.train_step(batch))
            t2 = time.perf_counter()
            floor_step()
            t3 = time.perf_counter()
            trainer.train_step(fixed)
            t4 = time.perf_counter()
            iteration.append(t2 - t0)
            wait.append(t1 - t0)
            floor.append(t3 - t2)
            step.append(t4 - t3)
        out["iteration_s"], out["wait_s"] = _median(iteration), _median(wait)
        out["floor_s"], out["step_s"] = _median(floor), _median(step)
        out["ratio"] = _median([a / b for a, b in zip(iteration, floor)])  # paired within a round
        out["ratio_best"] = min(iteration) / min(floor)
        out["times_s"] = {"iteration": iteration, "wait": wait, "floor": floor, "step": step}

        # --- per-epoch work
        t0 = time.perf_counter()
        trainer.on_train_epoch_end(train_outputs)
        with torch.no_grad():
            trainer.on_validation_epoch_start()
            val_times, val_outputs = [], []
            for _ in range(trainer.num_val_iterations_per_epoch):
                v0 = time.perf_counter()
                val_outputs.append(trainer.validation_step(next(trainer.dataloader_val)))
                val_times.append(time.perf_counter() - v0)
            trainer.on_validation_epoch_end(val_outputs)
        e0 = time.perf_counter()
        trainer.on_epoch_end()  # logging; the first epoch also writes checkpoint_best.pth
        out["epoch_end_s"] = time.perf_counter() - e0
        out["validation_step_s"] = _median(val_times)
        out["validation_s"] = sum(val_times)
        out["epoch_work_s"] = time.perf_counter() - t0
        logger = trainer.logger
        try:  # the trainer draws progress.png every save_every epochs: time nnU-Net's own drawing once
            p0 = time.perf_counter()
            type(logger).plot_progress_png(logger, trainer.output_folder)
            out["progress_png_s"] = time.perf_counter() - p0
        except Exception as exc:  # noqa: BLE001 -- reported, not fatal
            out["progress_png_s"] = None
            out["progress_png_error"] = f"{type(exc).__name__}: {exc}"
        plot_per_epoch = (out["progress_png_s"] or 0.0) / max(1, trainer.save_every)
        out["epoch_work_per_iteration_s"] = (out["epoch_work_s"] + plot_per_epoch) / max(1, trainer.num_iterations_per_epoch)
    finally:
        t0 = time.perf_counter()
        with contextlib.suppress(Exception):
            trainer.on_train_end()  # checkpoint_final.pth and the loaders' shutdown
        out["on_train_end_s"] = time.perf_counter() - t0
        for loader in (trainer.dataloader_train, trainer.dataloader_val):
            finish = getattr(loader, "_finish", None)
            if finish is not None:
                with contextlib.suppress(Exception):
                    finish()
    trainer.network.train()
    network, loss, optimizer = trainer.network, trainer.loss, trainer.optimizer
    data, targets, outer_autocast = fixed["data"], fixed["target"], out["floor_outer_autocast"]

    with FlopCounterMode(display=False) as counter:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16) if outer_autocast else contextlib.nullcontext():
            value = loss(network(data), targets)
        value.backward()
    optimizer.zero_grad(set_to_none=True)
    out["gflop_per_iteration"] = counter.get_total_flops() / 1e9

    # --- data loading alone: the worker's work per batch, computed here with no worker running
    generator = getattr(trainer.dataloader_train, "generator", trainer.dataloader_train)
    next(generator)
    data_times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        next(generator)
        data_times.append(time.perf_counter() - t0)
    out["data_s"] = _median(data_times)
    return out


def worker(stages: list[str], iterations: int, warmup: int, dense_seconds: float) -> dict:
    """One mode: the environment is already this process's; returns what the parent tabulates."""
    results_dir = Path(os.environ["nnUNet_results"])
    log_path = results_dir / "nnunet_stdout.log"
    results_dir.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as fh, contextlib.redirect_stdout(fh):  # nnU-Net prints a lot: not on our stdout
        t0 = time.perf_counter()
        import torch

        from spinemets.training.trainers import spinemets_trainers

        if os.environ.get("SPINEMETS_TORCH_THREADS") is None:
            torch.set_num_threads(os.cpu_count() or 1)  # as nnUNetv2_train does on a CPU
        import_s = time.perf_counter() - t0
        mode = os.environ.get("SPINEMETS_BENCH_MODE", "?")
        log(f"[{mode}] measuring dense Conv3d throughput ({dense_seconds:.0f} s)")
        dense = dense_conv_gflops(dense_seconds)
        result = {
            RESULT_KEY: 1,
            "mode": mode,
            "import_s": import_s,
            "torch": torch.__version__,
            "cpu_model": spinemets_trainers.cpu_description()["model"],
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_bf16_supported": spinemets_trainers.cpu_bf16_supported(),
            "threads": torch.get_num_threads(),
            "env": {k: os.environ.get(k) for k in ("SPINEMETS_CPU_BF16", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY",
                                                   "OMP_WAIT_POLICY", "nnUNet_n_proc_DA", "SPINEMETS_TORCH_THREADS")},
            "dense": dense,
            "stages": [],
        }
        for stage in stages:
            log(f"[{mode}] {stage}: {warmup} warm-up + {iterations} timed iterations")
            s = measure_stage(stage, iterations, warmup)
            s["floor_gflops"] = s["gflop_per_iteration"] / s["floor_s"]
            s["iteration_gflops"] = s["gflop_per_iteration"] / s["iteration_s"]
            s["floor_efficiency"] = s["floor_gflops"] / dense["gflops"]
            s["iteration_efficiency"] = s["iteration_gflops"] / dense["gflops"]
            s["ratio_with_epoch_work"] = (s["iteration_s"] + s["epoch_work_per_iteration_s"]) / s["floor_s"]
            log(f"[{mode}] {stage}: iteration {s['iteration_s']:.3f} s, floor {s['floor_s']:.3f} s, "
                f"ratio {s['ratio']:.2f}x")
            result["stages"].append(s)
    return result


# --------------------------------------------------------------------------------------------
# Parent: modes in subprocesses, the table
# --------------------------------------------------------------------------------------------


def run_mode(mode: str, ws, args) -> dict:

    results_tmp = Path(tempfile.mkdtemp(prefix=f"bench-train-results-{mode}-", dir=ws.root))
    # the demo's CPU environment (its OpenMP wait policy included), as nnunet.train sets it
    env = ws.environment(**cpu_environment(get_profile("demo").get("omp_wait_policy", "PASSIVE")))
    env.update(MODES[mode])
    env.update({"nnUNet_results": str(results_tmp), "SPINEMETS_BENCH_WORKSPACE": str(ws.root),
                "SPINEMETS_BENCH_MODE": mode, "PYTHONUNBUFFERED": "1"})
    if args.threads:
        env["SPINEMETS_TORCH_THREADS"] = str(args.threads)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--stages", ",".join(args.stages),
           "--iterations", str(args.iterations), "--warmup", str(args.warmup),
           "--dense-seconds", str(args.dense_seconds)]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
        if done.returncode != 0:
            tail = (results_tmp / "nnunet_stdout.log")
            extra = tail.read_text()[-3000:] if tail.is_file() else ""
            raise RuntimeError(f"mode {mode}: worker exited with {done.returncode}\n{extra}")
        for line in reversed(done.stdout.strip().splitlines()):
            with contextlib.suppress(ValueError):
                result = json.loads(line)
                if isinstance(result, dict) and result.get(RESULT_KEY):
                    result["wall_s"] = time.perf_counter() - t0
                    return result
        raise RuntimeError(f"mode {mode}: no result line in the worker's output:\n{done.stdout[-3000:]}")
    finally:
        shutil.rmtree(results_tmp, ignore_errors=True)


def _f(value, digits=3, suffix="") -> str:
    if value is None or value != value:
        return "–"
    return f"{value:.{digits}f}{suffix}"


def report(results: list[dict], setup_info: dict, args) -> str:
    lines = ["# One demo training iteration in nnU-Net vs the floor", ""]
    cpu = (results[0] if results else {}).get("cpu_model", platform.machine())
    lines.append(f"`{' '.join(['benchmarks/bench_train.py', *args.argv])}`; {cpu}, {os.cpu_count()} "
                 f"CPUs, Python {platform.python_version()}, torch {results[0]['torch'] if results else '?'}; "
                 f"{args.iterations} timed iterations (median) after {args.warmup} warm-up.")
    lines.append(f"Setup: {setup_info['seconds']} s ({args.cases} synthetic demo cases; 0 where reused).")
    lines.append("")
    lines.append("| mode | CPU capability | bf16 units | bf16 autocast | threads | dense GFLOP/s | stage | "
                 "GFLOP/it | nnU-Net it s | wait s | data s | floor s | step s | ratio | epoch/it s | "
                 "ratio incl. epoch | floor GFLOP/s | it GFLOP/s | floor eff. | it eff. |")
    lines.append("|" + "---|" * 20)
    for r in results:
        for s in r["stages"]:
            ok = "" if s["ratio"] <= GOAL else " ✗"
            lines.append(
                f"| {r['mode']} | {r['cpu_capability']} | {'yes' if r['cpu_bf16_supported'] else 'no'} | "
                f"{'on' if s['bf16_autocast'] else 'off'} | {s['threads']} | {_f(r['dense']['gflops'], 1)} | "
                f"{s['stage']} | {_f(s['gflop_per_iteration'], 2)} | {_f(s['iteration_s'])} | {_f(s['wait_s'])} | "
                f"{_f(s['data_s'])} | {_f(s['floor_s'])} | {_f(s['step_s'])} | {_f(s['ratio'], 2, 'x')}{ok} | "
                f"{_f(s['epoch_work_per_iteration_s'])} | {_f(s['ratio_with_epoch_work'], 2, 'x')} | "
                f"{_f(s['floor_gflops'], 1)} | {_f(s['iteration_gflops'], 1)} | {_f(100 * s['floor_efficiency'], 0, ' %')} | "
                f"{_f(100 * s['iteration_efficiency'], 0, ' %')} |")
    lines.append("")
    lines.append("Per-epoch work (seconds, once per epoch):")
    lines.append("")
    lines.append("| mode | stage | batch x patch | it/epoch | val steps x s | epoch end s (logging, checkpoint_best) | "
                 "progress.png s (every N epochs) | on_train_start s | on_train_end s |")
    lines.append("|" + "---|" * 9)
    for r in results:
        for s in r["stages"]:
            lines.append(
                f"| {r['mode']} | {s['stage']} | {s['batch_size']} x {'x'.join(map(str, s['patch_size']))} | "
                f"{s['iterations_per_epoch']} | {s['val_iterations_per_epoch']} x {_f(s['validation_step_s'])} | "
                f"{_f(s['epoch_end_s'])} | {_f(s['progress_png_s'])} (N={s['save_every']}) | "
                f"{_f(s['on_train_start_s'], 2)} | {_f(s['on_train_end_s'], 2)} |")
    lines += ["", "Columns: *nnU-Net it*: `train_step(next(dataloader_train))` in the trainer, with nnU-Net's data-loading "
              "worker running; *wait*: the part of it blocked in `next()`; *data*: one training batch computed "
              "in-process (the worker's CPU time per batch, which competes with the training threads on a small "
              "machine); *floor*: the trainer's network, loss and optimizer on a random batch of the same shape "
              "(forward, loss, backward, `optimizer.step()`; no loader, no loop), timed in the same rounds; *step*: the "
              "trainer's own `train_step` on that fixed batch (adds gradient clipping and copies); *ratio*: median of "
              f"the per-round ratios nnU-Net it / floor (goal <= {GOAL}x, ✗ above); *epoch/it*: the validation steps, epoch end and "
              "progress.png share of one epoch, per iteration; *eff.*: achieved GFLOP/s (FLOPs of forward + "
              "backward, `FlopCounterMode`) over the dense float32 Conv3d throughput of the same process (its best "
              "iteration).",
              "",
              "On a CPU without bfloat16 units (AVX2 only) `bf16-on` is emulated (slow) and `avx2` equals `native`. "
              "The machine may be shared: times are noisy; the ratios, measured in the same process, are what "
              "count."]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--quick", action="store_true", help="3 timed iterations, 2 s of dense convolution")
    parser.add_argument("--iterations", type=int, default=None, help="timed iterations per stage (default 10, --quick 3)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dense-seconds", type=float, default=None, help="seconds of the dense Conv3d (default 5, --quick 2)")
    parser.add_argument("--threads", type=int, default=None, help="SPINEMETS_TORCH_THREADS (default: nnU-Net's, one per core)")
    parser.add_argument("--cases", type=int, default=6, help="synthetic demo cases of the setup")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="keep (and reuse) the setup here; default: a temporary folder")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here (atomically)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results (JSON) here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.iterations = args.iterations or (3 if args.quick else 10)
    args.dense_seconds = args.dense_seconds or (2.0 if args.quick else 5.0)
    args.stages = [s for s in args.stages.split(",") if s]
    args.warmup = max(1, args.warmup)  # the floor takes its shapes from a warm-up batch
    if args.worker:
        print(json.dumps(worker(args.stages, args.iterations, args.warmup, args.dense_seconds)), flush=True)
        return 0
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes + args.stages if m not in MODES and m not in STAGES]
    if unknown:
        parser.error(f"unknown mode or stage: {', '.join(unknown)}")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):  # everything under the bench's workspace
        os.environ.pop(var, None)

    workdir = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        t0 = time.perf_counter()
        info = setup(workdir, args.cases, args.seed)
        info["seconds"]["total"] = round(time.perf_counter() - t0, 1)
        log(f"setup done in {info['seconds']['total']:.1f} s: {info['seconds']}")
        results = []
        for mode in modes:
            log(f"mode {mode}: {MODES[mode] or 'environment as is'}")
            results.append(run_mode(mode, info["workspace"], args))
            log(f"mode {mode}: done in {results[-1]['wall_s']:.0f} s")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    text = report(results, info, args)
    print(text)
    if args.out:
        write_atomic(args.out, text)
        log(f"wrote {args.out}")
    if args.json:
        write_atomic(args.json, json.dumps({"setup_s": info["seconds"], "modes": results}, indent=1) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
