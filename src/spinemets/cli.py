"""The ``spinemets`` command: one subcommand per pipeline step, each a thin layer over one function.

The parser only converts arguments; the work is done by the function named in each
subcommand's help, which the tests and notebooks call directly. Choices (stages, presets,
profiles) come from the data tables of the modules, so they cannot drift.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from spinemets import __version__
from spinemets.errors import SpinemetsError
from spinemets.labels import STAGE_NAMES, VERTEBRA_SOURCES
from spinemets.evaluation.metrics import IOU_THRESHOLD, MATCH_RULES


def _parse_assignments(items: list[str] | None, what: str) -> dict[str, str]:
    result = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpinemetsError(f"{what}: {item!r} must look like NAME=VALUE")
        result[key] = value
    return result


def _cmd_synth(a):
    from spinemets.cohort.synth import synthesize_cohort

    path = synthesize_cohort(out_dir=a.out, cases=a.cases, seed=a.seed, preset=a.preset, jobs=a.jobs)
    print(f"wrote {path}")


def _cmd_scan(a):
    from spinemets.cohort.dataset import scan
    from spinemets.cohort.discovery import explain

    segs = _parse_assignments(a.segmentation, "--segmentation") or None
    if a.mapping_template is not None and not a.explain:
        raise SpinemetsError("--mapping-template: goes with --explain")
    if a.explain:
        if a.image is not None or segs is not None:
            raise SpinemetsError("--explain: shows the discovered layout; leave out --image and --segmentation")
        template = a.mapping_template or a.out.with_name(
            (a.out.name[:-4] if a.out.name.lower().endswith(".csv") else a.out.name) + ".mapping.yaml")
        print(explain(root=a.root, mapping=a.mapping, template=template), end="")
        return
    manifest = scan(root=a.root, out_csv=a.out, image=a.image, segmentations=segs,
                     holdout=a.holdout, pseudonymize=a.pseudonymize, mapping=a.mapping)
    print(f"wrote {a.out}: {manifest['case_id'].nunique()} case(s), {len(manifest)} row(s)")


def _cmd_import(a):
    from spinemets.cohort.dataset import import_dataset

    folder = import_dataset(manifest=a.manifest, stage=a.stage, raw_dir=a.out,
                   dataset_id=a.dataset_id, mapping=a.mapping, jobs=a.jobs, skip_empty=a.skip_empty)
    print(f"wrote {folder}")


def _cmd_evaluate(a):
    from spinemets.evaluation.evaluate import evaluate_folders
    from spinemets.evaluation.metrics import ScoringOptions

    evaluate_folders(ref_dir=a.ref, pred_dir=a.pred, stage=a.stage, out_dir=a.out,
                     options=ScoringOptions(beta=a.beta, match=a.match), jobs=a.jobs, plot=a.plot)
    print(f"wrote {Path(a.out) / 'summary.csv'}")
    if a.stage == "metastases":
        print(f"wrote {Path(a.out) / 'froc.csv'} and the other detection tables (froc_summary.csv, lesion_bands.csv, "
              f"patients.csv{', froc.png' if a.plot else ''})")


#: The job options of ``train`` and ``run``: flag -> field of :class:`spinemets.run.cluster.JobOptions`.
_JOB_FLAGS = {"--run-folder": "folder", "--num-gpus": "num_gpus", "--partition": "partition",
              "--gpus-per-job": "gpus_per_job", "--time-min": "time_min", "--mem-gb": "mem_gb",
              "--cpus-per-task": "cpus_per_task"}


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def _job_options(a):
    from spinemets.run.cluster import JobOptions

    return JobOptions(executor=a.executor, **{field: getattr(a, _dest(flag)) for flag, field in _JOB_FLAGS.items()})


def _submitted(a, record: dict) -> None:
    from spinemets.run.cluster import wait

    print(f"run folder: {record['folder']}\nwatch with: spinemets jobs {record['folder']}")
    if a.wait and record["executor"] == "slurm":
        table = wait(run_folder=record["folder"], poll_s=a.poll)
        print(table.to_string(index=False))


def _no_job_options(a) -> None:
    given = [flag for flag in (*_JOB_FLAGS, "--wait") if getattr(a, _dest(flag))]
    if given:
        raise SpinemetsError(f"{given[0]}: {', '.join(given)} go(es) with --executor local|slurm")


def _cmd_train(a):
    from spinemets.run.cluster import submit
    from spinemets.training.nnunet import train
    from spinemets.training.profiles import stage_budget

    if a.executor and a.train_budget is not None:
        raise SpinemetsError("--train-budget: jobs train for the profile's budget; it applies to local training only")
    if a.executor:
        _submitted(a, submit(stages=a.stage, profile=a.profile, workspace=a.workspace,
                            configurations=a.configurations, folds=a.folds, device=a.device, jobs=_job_options(a)))
        return
    _no_job_options(a)
    for stage in a.stage:
        options = nnunet_options(budget_s=stage_budget(stage=stage, profile=a.profile,
                                                total_min=a.train_budget))
        train(stage=stage, profile=a.profile, configurations=a.configurations, folds=a.folds,
              device=a.device, workspace=a.workspace, options=options)


def _cmd_jobs(a):
    from spinemets.run.cluster import resubmit, status

    if a.resubmit:
        resubmit(run_folder=a.run_folder)
    table = status(run_folder=a.run_folder)
    print(table.to_string(index=False))


def _cmd_predict(a):
    from spinemets.inference.predict import PredictOptions, predict

    options = PredictOptions(roi=a.roi, min_lesion_ml=a.min_lesion_ml, min_vertebra_ml=a.min_vertebra_ml,
                             repair_order=a.repair_order, min_confidence=a.min_confidence,
                             spine_only=a.spine_only, spine_margin_mm=a.spine_margin_mm)
    predict(input=a.input, out_dir=a.out, profile=a.profile, workspace=a.workspace,
            device=a.device, options=options, model=a.model, vertebrae=a.vertebrae)
    print(f"wrote {a.out}")


def _cmd_export_model(a):
    from spinemets.training.sharing import export_model

    path = export_model(out=a.out, profile=a.profile, workspace=a.workspace, stages=a.stage,
                        name=a.name, dataset=a.dataset, licence=a.licence)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def _cmd_install_model(a):
    from spinemets.training.sharing import install_model

    print(f"installed {install_model(archive=a.archive, models=a.models, name=a.name)}")


def nnunet_options(**fields):
    from spinemets.training.nnunet import TrainingOptions

    return TrainingOptions(**fields)


def _cmd_run(a):
    from spinemets.run.cluster import submit_run
    from spinemets.run.runner import dry_run, run

    params = {name: value for name, value in (a.parameter or [])}
    if a.train_budget is not None:
        if a.executor:
            raise SpinemetsError("--train-budget: cluster jobs train for the profile's budget; "
                                 "it applies to local runs only")
        params["train_budget_min"] = a.train_budget
    if a.executor:
        _submitted(a, submit_run(profile=a.profile, parameters=params, jobs=_job_options(a)))
        return
    _no_job_options(a)
    if a.dry_run:
        for name, source, values in dry_run(profile=a.profile, parameters=params):
            print(f"{name} ({source}): {values}")
        return
    run(profile=a.profile, parameters=params)


def _add_job_options(p: argparse.ArgumentParser, what: str) -> None:
    jobs = p.add_argument_group("jobs", what)
    jobs.add_argument("--executor", choices=("local", "slurm"), default=None,
                      help="submit the work as jobs: slurm (returns once queued) or local (one after the other, "
                           "here); default: run it in this process")
    jobs.add_argument("--run-folder", type=Path, default=None, help="where the run record and job logs go")
    jobs.add_argument("--wait", action="store_true", help="with slurm: wait until every job is done (or one failed)")
    jobs.add_argument("--poll", type=float, default=30.0, help="seconds between looks at the jobs with --wait")
    jobs.add_argument("--partition", default=None)
    jobs.add_argument("--gpus-per-job", type=int, default=None)
    jobs.add_argument("--time-min", type=int, default=None, help="time limit per job, minutes")
    jobs.add_argument("--mem-gb", type=float, default=None)
    jobs.add_argument("--cpus-per-task", type=int, default=None)
    jobs.add_argument("--num-gpus", type=int, default=None, help="GPUs per training (nnU-Net's own DDP)")


def _cmd_book(a):
    from spinemets.run.runner import build_run_book

    print(build_run_book(out_dir=a.run))


def _cmd_fetch(a):
    from spinemets.cohort.fetch import fetch_record

    path = fetch_record(record=a.record, out_dir=a.out, api_url=a.api_url, retries=a.retries,
                 backoff=a.backoff)
    print(f"wrote {path}")


def _cmd_convert(a):
    from spinemets.formats.images import convert

    path = convert(input=a.input, out=a.out, series_uid=a.series_uid)
    print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spinemets", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"spinemets {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic cohort of CTs and 3D Slicer masks (cohort.synth.synthesize_cohort)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--cases", type=int, default=24, help="number of cases (default 24)")
    p.add_argument("--seed", type=int, default=0, help="random seed; one seed gives byte-identical files")
    p.add_argument("--preset", default="demo", help="size preset: demo (CPU-sized) or full (clinical size)")
    p.add_argument("--jobs", type=int, default=1, help="parallel processes")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("scan", help="list the cases of a folder in a manifest CSV (cohort.dataset.scan)")
    p.add_argument("root", type=Path, help="folder holding the cases")
    p.add_argument("--out", required=True, type=Path, help="manifest CSV to write")
    p.add_argument("--image", default=None,
                   help="image path pattern with {case}, e.g. {case}/ct.nrrd (default: discover the layout)")
    p.add_argument("--segmentation", action="append", metavar="STAGE=PATTERN",
                   help="mask pattern per stage, e.g. metastases={case}/metastases.seg.nrrd (repeatable; "
                        "default: discover the layout; with --image alone: the synthetic layout, both stages)")
    p.add_argument("--holdout", type=int, default=0, help="mark the last N cases as the test split")
    p.add_argument("--pseudonymize", action="store_true",
                   help="replace case IDs by pseudonyms; the private mapping stays beside the source data")
    p.add_argument("--explain", action="store_true",
                   help="dry run: print the discovered plan (cases, files, segment names and what they map to, "
                        "files not used and why) and write a mapping template; no manifest (discovery.explain)")
    p.add_argument("--mapping", type=Path, default=None,
                   help="the filled mapping template (or a YAML/JSON mapping of names/values to labels) that "
                        "answers the open questions of --explain; give it to import too")
    p.add_argument("--mapping-template", type=Path, default=None,
                   help="where --explain writes the mapping template (default: beside --out, NAME.mapping.yaml)")
    p.set_defaults(func=_cmd_scan)

    p = sub.add_parser("import", help="write an nnU-Net raw dataset from a manifest (cohort.dataset.import_dataset)")
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--stage", required=True, choices=STAGE_NAMES)
    p.add_argument("--out", required=True, type=Path, help="nnU-Net raw folder (nnUNet_raw)")
    p.add_argument("--dataset-id", type=int, default=None, help="nnU-Net dataset id (default: 501 vertebrae, 502 metastases)")
    p.add_argument("--mapping", type=Path, default=None,
                   help="YAML/JSON file mapping segment names or label values to labels (or null), the filled "
                        "template of scan --explain, or a built-in mapping: totalsegmentator, verse")
    p.add_argument("--jobs", type=int, default=1, help="parallel processes")
    p.add_argument("--skip-empty", action="store_true",
                   help="vertebra stage: leave out cases whose mask holds no vertebra (listed in the log and "
                        "the import record), instead of stopping")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("evaluate", help="score predictions against references (evaluation.evaluate.evaluate_folders)")
    p.add_argument("--ref", required=True, type=Path, help="folder of reference label maps")
    p.add_argument("--pred", required=True, type=Path, help="folder of predicted label maps")
    p.add_argument("--stage", required=True, choices=STAGE_NAMES)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--beta", type=float, default=2.0, help="F-beta weight of recall (default 2, as the paper)")
    p.add_argument("--match", choices=MATCH_RULES, default="iou",
                   help=f"lesion matching: IoU > {IOU_THRESHOLD} (default) or any overlap")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--plot", action="store_true",
                   help="lesion stage: also draw the FROC curve as froc.png (matplotlib: about half a second more)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("train", help="plan, preprocess and train stages with nnU-Net (training.nnunet.train; "
                                     "with --executor, as jobs: cluster.submit)")
    p.add_argument("--stage", required=True, nargs="+", choices=STAGE_NAMES)
    p.add_argument("--profile", default="demo", help="training profile (spinemets.training.profiles.PROFILES): demo, ci, smoke, paper, resenc_m, resenc_l (the paper's protocol with nnU-Net's residual-encoder presets) or gpu_check")
    p.add_argument("--configurations", nargs="+", default=None, help="nnU-Net configurations (default: the profile's)")
    p.add_argument("--folds", nargs="+", default=None, help="folds, e.g. 0 1 2 3 4 or all (default: the profile's)")
    p.add_argument("--device", choices=("cpu", "cuda", "mps"), default=None,
                   help="default: the profile's (mps: Apple silicon's GPU, as nnU-Net's -device mps)")
    p.add_argument("--train-budget", type=float, default=None, metavar="MINUTES",
                   help="opt-in: wall-clock minutes of training of both stages together, shared in the profile's "
                        "proportions (demo: 2:1 vertebrae:lesions), for each configuration and fold (the demo trains "
                        "one per stage); a faster CPU then trains more. Default: the profile's fixed iterations")
    p.add_argument("--workspace", type=Path, default=None, help="workspace folder (default: ./workspace)")
    _add_job_options(p, "one job per (stage, configuration, fold), chained by afterok dependencies")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("jobs", help="state of every job of a run, from SLURM's accounting (run.cluster.status)")
    p.add_argument("run_folder", type=Path)
    p.add_argument("--resubmit", action="store_true",
                   help="first send again the failed or cancelled steps and their dependents (run.cluster.resubmit)")
    p.set_defaults(func=_cmd_jobs)

    p = sub.add_parser("predict", help="two-stage inference and lesion localization (inference.predict.predict)")
    p.add_argument("--input", required=True, type=Path,
                   help="a CT file, a folder of CTs, a DICOM series folder, or a folder of case folders each "
                        "holding one DICOM series (TCIA's layout); DICOM inputs also get DICOM-SEG outputs")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--profile", default="demo")
    p.add_argument("--roi", choices=("none", "spine"), default="none",
                   help="lesion stage on the whole CT (none, as the paper) or on the spine's box (spine)")
    p.add_argument("--device", choices=("cpu", "cuda", "mps"), default=None,
                   help="default: the profile's; with --model the best available (cuda, else mps, else cpu)")
    p.add_argument("--model", type=Path, default=None, metavar="ARCHIVE_OR_FOLDER",
                   help="an exported model (the archive of export-model, or a folder install-model wrote) instead "
                        "of the profile's trained models; its card's inference settings replace the profile's")
    p.add_argument("--vertebrae", choices=tuple(VERTEBRA_SOURCES), default="trained",
                   help="stage 1: the trained vertebra model (trained), or TotalSegmentator's public CT model "
                        "(totalsegmentator; totalsegmentator-fast: its 3 mm model), installed with "
                        "pip install 'spinemets[totalsegmentator]'; its weights download on first use")
    p.add_argument("--workspace", type=Path, default=None)
    p.add_argument("--min-lesion-ml", type=float, default=None,
                   help="clear predicted lesions smaller than this (mL), after giving a lesion's parts of the other "
                        "type below it the lesion's main type; default: the profile's (paper: 0)")
    p.add_argument("--min-vertebra-ml", type=float, default=None,
                   help="clear fragments of a vertebra label smaller than this (mL); default: the profile's (paper: 0)")
    p.add_argument("--repair-order", action=argparse.BooleanOptionalAction, default=None,
                   help="put the vertebra labels in the spine's order (inference.postprocessing.repair_vertebra_order); "
                        "default: the profile's (demo: on, paper: off)")
    p.add_argument("--min-confidence", type=float, default=None, metavar="X",
                   help="clear predicted lesions whose confidence (the largest probability of its class over a "
                        "lesion's voxels) is below X (0-1); default: the profile's (0: none cleared)")
    p.add_argument("--spine-only", action=argparse.BooleanOptionalAction, default=None,
                   help="clear predicted lesions that localization would call 'outside spine' (no overlap with, and "
                        "further than --spine-margin-mm from, every predicted vertebra); default: the profile's "
                        "(demo: on, paper: off)")
    p.add_argument("--spine-margin-mm", type=float, default=None, metavar="MM",
                   help="with --spine-only: how far from a vertebra a kept lesion may lie (0: it must touch one); "
                        "default: the profile's (demo: 0)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export-model", help="one archive of a run's trained models with nnU-Net's export, the domain "
                                            "records and a model card (training.sharing.export_model)")
    p.add_argument("--out", required=True, type=Path, help="the archive to write (.zip)")
    p.add_argument("--profile", default="demo", help="the training profile of the run")
    p.add_argument("--workspace", type=Path, default=None, help="workspace folder (default: ./workspace)")
    p.add_argument("--stage", nargs="+", choices=STAGE_NAMES, default=None, help="default: both")
    p.add_argument("--name", default=None, help="the model's name (default: spinemets-PROFILE-STAGES)")
    p.add_argument("--dataset", default=None, help="the training data for the card (required for real data), "
                                                   "e.g. 'doi:10.5281/zenodo.13645871'")
    p.add_argument("--licence", default=None, help="the training data's licence for the card (required for real data)")
    p.set_defaults(func=_cmd_export_model)

    p = sub.add_parser("install-model", help="check a model archive completely, then unpack it into the models "
                                             "folder (training.sharing.install_model)")
    p.add_argument("archive", type=Path)
    p.add_argument("--models", type=Path, default=None,
                   help="models folder (default: $SPINEMETS_MODELS, else ~/.local/share/spinemets/models)")
    p.add_argument("--name", default=None, help="folder name (default: the card's name)")
    p.set_defaults(func=_cmd_install_model)

    p = sub.add_parser("run", help="execute the notebooks of a profile with papermill and build the book (run.runner.run)")
    p.add_argument("--profile", default="demo", help="demo, ci, smoke, paper, or a path to a profile YAML")
    p.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="override a notebook parameter (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the profile and the parameters, print each notebook with its parameters, run nothing")
    p.add_argument("--train-budget", type=float, default=None, metavar="MINUTES",
                   help="opt-in: wall-clock minutes of training for the run (both stages, per configuration and fold: "
                        "the demo trains one per stage), shared in the profile's proportions (demo: 2:1); a faster "
                        "CPU then trains more, and the results page says so. Default: the profile's fixed "
                        "iterations (demo: 1000 vertebrae, 1800 lesions); same as -p train_budget_min")
    _add_job_options(p, "the notebooks before training as one job, one job per (stage, configuration, fold), "
                        "then the remaining notebooks and the book as one job (cluster.submit_run)")
    p.set_defaults(func=_cmd_run)

    what = "build the book again from a finished run, without executing or training anything (runner.build_run_book)"
    p = sub.add_parser("book", help=what, description=what)
    p.add_argument("--run", type=Path, default=Path("build/executed"), metavar="FOLDER",
                   help="the run folder, relative to the project root (default: build/executed)")
    p.set_defaults(func=_cmd_book)

    p = sub.add_parser("fetch", help="download a Zenodo record with checksums and resume (cohort.fetch.fetch_record)")
    p.add_argument("--record", required=True, help="Zenodo record id, e.g. 13645871")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--api-url", default="https://zenodo.org/api", help="API base URL (a mirror or test server)")
    p.add_argument("--retries", type=int, default=4, help="further tries of a failed request (default 4)")
    p.add_argument("--backoff", type=float, default=1.0,
                   help="seconds before the first retry, doubling after each (default 1)")
    p.set_defaults(func=_cmd_fetch)

    p = sub.add_parser("convert", help="convert a DICOM series, NRRD or NIfTI image (formats.images.convert)")
    p.add_argument("input", type=Path, help="DICOM series folder or image file")
    p.add_argument("--out", required=True, type=Path, help="output image, e.g. ct.nii.gz")
    p.add_argument("--series-uid", default=None, help="series to take when the folder holds several")
    p.set_defaults(func=_cmd_convert)
    return parser


#: Exit status of a command that met bad input or a failed step (argparse's own for bad arguments).
EXIT_ERROR = 2
#: Exit status of an unexpected internal error (a bug: please report it with the ``-v`` traceback).
EXIT_INTERNAL = 70


def error_line(exc: BaseException) -> str:
    """The one line the command prints for an error: ``spinemets: error: PATH: what is wrong``.

    :class:`SpinemetsError` messages already start with the path; an :class:`OSError` gets its
    file name and the system's reason. Control characters (a line break or tab inside a path or
    a message) are written as escapes (``\\n``, ``\\t``), so the error is one line.
    """
    if isinstance(exc, SpinemetsError):
        text = str(exc)
    elif isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else "?"
        text = f"{where}: {exc.strerror or exc}" + (f" (with {exc.filename2})" if exc.filename2 is not None else "")
    else:
        text = f"internal error ({type(exc).__name__}: {exc}); please report it with the output of -v"
    return "spinemets: error: " + text.translate(_ESCAPES)


#: Control characters written as escapes, so that the error stays on one line and a path that
#: holds a tab or a line break is shown as it is (``ct\tx.nrrd``), not changed into another.
_ESCAPES = {i: f"\\x{i:02x}" for i in [*range(32), 127]} | {9: "\\t", 10: "\\n", 13: "\\r"}


class _OneLineFormatter(logging.Formatter):
    """Log records with control characters escaped (a path may hold a line break), tracebacks kept."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record).translate(_ESCAPES)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:  # one line per log record, whatever a path holds
        handler.setFormatter(_OneLineFormatter("%(levelname)s %(message)s"))
    if not args.verbose:  # ITK's own warnings go to the terminal, past Python; the checks here say it in one line
        import SimpleITK as sitk

        sitk.ProcessObject_SetGlobalWarningDisplay(False)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("spinemets: interrupted", file=sys.stderr)
        return 130
    except (SpinemetsError, OSError) as exc:
        print(error_line(exc), file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a bug: one line, the traceback only with -v
        if args.verbose:
            logging.exception("internal error")
        print(error_line(exc), file=sys.stderr)
        return EXIT_INTERNAL
    return 0


if __name__ == "__main__":
    sys.exit(main())
