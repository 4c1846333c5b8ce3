"""Shared fixtures: paths to the real test data, a small case builder (CT + 3D Slicer masks), a copy of
the project for runs, and a one-node SLURM (tests/slurm_cluster.py)."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

import pipeline_guard as pipeline_guard_module
import slurm_cluster
from spinemets import labels
from spinemets.formats.slicer import write_segments

REPO = Path(__file__).resolve().parents[1]

# The book builds of the tests (each in its own copy of the project) share one cache of the niivue
# package taken from the npm registry (spinemets.report.viewer.vendor_niivue), instead of one per copy.
# `make test` fills it before the tests start; no test fetches it (SPINEMETS_NO_DOWNLOAD).
os.environ.setdefault("SPINEMETS_VENDOR_DIR", str(REPO / "build" / "vendor"))
os.environ["SPINEMETS_NO_DOWNLOAD"] = "1"
SHARED_DATA = REPO.parent / "shared" / "data"


def skip_or_fail(reason: str, require: str):
    """A test's tool or service is missing: skip with ``reason``, or fail where the environment
    variable ``require`` is set (CI sets them, so that what it installed must be there)."""
    if os.environ.get(require):
        pytest.fail(f"{require}={os.environ[require]} but {reason}")
    pytest.skip(f"{reason} (set {require}=1 to fail instead)")


def require_niivue_cache() -> Path:
    """The npm tarball of niivue that ``make test`` (``make vendor``) put in the vendoring cache; a
    test whose book must embed the viewer skips without it (fails with ``SPINEMETS_REQUIRE_BROWSER``,
    as in CI)."""
    from spinemets.report import viewer

    tarball = Path(os.environ["SPINEMETS_VENDOR_DIR"]) / f"niivue-niivue-{viewer.NIIVUE_VERSION}.tgz"
    if not tarball.is_file():
        skip_or_fail(f"niivue is not in the vendoring cache ({tarball}); run `make vendor` (needs npm)",
                     "SPINEMETS_REQUIRE_BROWSER")
    return tarball


@pytest.fixture(scope="session", autouse=True)
def pipeline_guard():
    """Counts the session's pipeline runs as they start (tests/pipeline_guard.py)."""
    from spinemets.run import cluster, runner

    guard = pipeline_guard_module.Guard()
    wrapped = {}

    def counting(module, name):
        original = getattr(module, name)

        def call(profile, *args, **kwargs):
            guard.started(profile)
            return original(profile, *args, **kwargs)

        wrapped[(module, name)] = original
        setattr(module, name, call)

    counting(runner, "run")
    counting(cluster, "submit_run")
    yield guard
    for (module, name), original in wrapped.items():
        setattr(module, name, original)


def pytest_sessionfinish(session, exitstatus):
    """Fail the session when it trained more nnU-Net models than its fixtures need."""
    basetemp = getattr(session.config, "_tmp_path_factory", None)
    try:
        root = basetemp.getbasetemp() if basetemp else None
    except (OSError, ValueError):
        root = None
    if root is None or not Path(root).is_dir():
        return
    problem = pipeline_guard_module.training_problem(pipeline_guard_module.trainings(root))
    if problem:
        session.config.stash[_GUARD_PROBLEM] = problem
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_GUARD_PROBLEM = pytest.StashKey[str]()


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The guard's failure last, beside the summary line (what a CI log's tail shows)."""
    problem = config.stash.get(_GUARD_PROBLEM, None)
    if problem:
        terminalreporter.write_sep("=", "pipeline guard", red=True)
        terminalreporter.write_line(f"ERROR (pipeline guard): {problem}")


@pytest.fixture(scope="session")
def totalseg_dir() -> Path:
    """Real CT and two TotalSegmentator segmentations of it (Apache-2.0), beside the checkout."""
    folder = SHARED_DATA / "totalsegmentator"
    if not (folder / "example_ct_sm.nii.gz").exists():
        pytest.skip(f"real test data not found at {folder} (the shared/ folder beside the checkout)")
    return folder


@pytest.fixture(scope="session")
def slicerio_data() -> Path:
    """The real 3D Slicer files shipped in the slicerio wheel."""
    return Path(os.path.dirname(slicerio.__file__)) / "data"


def digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file below ``folder``, by relative path: equal trees give equal dicts."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def make_ct(shape=(24, 20, 16), spacing=(1.5, 1.2, 2.5), origin=(-10.0, 20.0, -300.0), seed=0) -> sitk.Image:
    """A small int16 CT-like image; ``shape`` is (x, y, z) like SimpleITK sizes."""
    rng = np.random.default_rng(seed)
    array = rng.normal(40, 20, size=shape[::-1]).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def vertebra_labelmap(ct: sitk.Image, names=("T12", "L1", "L2")) -> np.ndarray:
    """Stacked boxes, one per vertebra, cranial at high z (LPS: z grows toward the head)."""
    nz = ct.GetSize()[2]
    lab = np.zeros(ct.GetSize()[::-1], dtype=np.uint8)
    height = nz // len(names)
    for i, name in enumerate(names):
        z1 = nz - i * height
        lab[z1 - height + 1 : z1 - 1, 5:15, 6:18] = labels.STAGES["vertebrae"]["labels"][name]
    return lab


def write_case(folder: Path, ct: sitk.Image, vert: np.ndarray, lesions: list[tuple[str, np.ndarray]]) -> Path:
    """Write ct.nrrd, vertebrae.seg.nrrd and metastases.seg.nrrd the way the synthetic cohort lays them out."""
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(ct, str(folder / "ct.nrrd"), True)
    names = labels.label_names("vertebrae")
    segs = [{"name": names[v], "mask": vert == v, "color": labels.colour("vertebrae", names[v])}
            for v in sorted(set(np.unique(vert).tolist()) - {0})]
    write_segments(folder / "vertebrae.seg.nrrd", ct, segs)
    write_segments(folder / "metastases.seg.nrrd", ct, [{"name": n, "mask": m} for n, m in lesions])
    return folder


@pytest.fixture
def small_cohort(tmp_path) -> Path:
    """Three small cases in the synthetic layout; case_002 has no lesion, case_003 has overlapping lesions."""
    root = tmp_path / "cohort"
    for index in range(1, 4):
        ct = make_ct(seed=index)
        write_case(root / f"case_{index:03d}", ct, vertebra_labelmap(ct), small_cohort_lesions(ct, index))
    return root


def small_cohort_lesions(ct: sitk.Image, index: int) -> list[tuple[str, np.ndarray]]:
    """The named lesion masks of case ``index`` of :func:`small_cohort` (none for case 2; two overlapping for case 3)."""
    shape = ct.GetSize()[::-1]
    lesions = []
    if index != 2:
        lytic = np.zeros(shape, dtype=bool)
        lytic[3:6, 8:11, 8:12] = True
        lesions.append(("Lytic", lytic))
    if index == 3:
        blastic = np.zeros(shape, dtype=bool)
        blastic[5:7, 9:12, 10:14] = True  # overlaps the lytic lesion: a second layer
        lesions.append(("blastic", blastic))
    return lesions


def copy_project(root: Path) -> Path:
    """The parts of the project a run needs (book, notebooks, profiles, book config) in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(REPO / name, root / name)
    for folder in ("book", "notebooks", "profiles"):
        shutil.copytree(REPO / folder, root / folder)
    return root


@pytest.fixture(scope="session")
def ci_run(tmp_path_factory) -> Path:
    """``spinemets run --profile ci`` (every notebook, then the book) in a copy of the project, once
    per session; returns the project folder: the run in ``build/executed/``, the book in
    ``_build/html/``, the workspace (trained models, predictions, evaluation) in ``workspace/ci/``.

    Every test that needs trained models, predictions or a built book reads this run; a test that
    trains or writes must work on a copy of what it needs (:func:`copy_workspace`).
    ``SPINEMETS_CI_PROJECT=FOLDER`` reuses the project folder of a finished run instead (when
    working on these tests).
    """
    from spinemets.run import runner

    reuse = os.environ.get("SPINEMETS_CI_PROJECT")
    if reuse:
        return Path(reuse)
    root = copy_project(tmp_path_factory.mktemp("ci") / "project")
    runner.run("ci", root=root)
    return root


def copy_workspace(src, dst: Path, stages=("vertebrae", "metastases"), parts=("raw", "preprocessed")):
    """A new workspace at ``dst`` holding ``parts`` (``raw``, ``preprocessed``, ``results``) of the
    stages' datasets of the workspace ``src`` (a folder or a Workspace), for a test that trains or
    writes where the shared run must stay as it is. Absolute paths in the selection's files are
    pointed at the copy."""
    from spinemets.paths import Workspace

    src = src if isinstance(src, Workspace) else Workspace(src)
    dst = Workspace(dst)
    for part in parts:  # the layout under each root (nnU-Net's environment variables do not move them here)
        for stage in stages:
            name = src.dataset_name(stage)
            if (src.root / part / name).exists():
                shutil.copytree(src.root / part / name, dst.root / part / name, symlinks=True)
    for info in (dst.root / "results").glob("*/inference_information.json"):
        info.write_text(info.read_text().replace(str(src.root / "results"), str(dst.root / "results")))
    return dst


@pytest.fixture(scope="session")
def slurm():
    """A running one-node SLURM with accounting; ``SLURM_CONF`` and ``PYTHONPATH`` (for the payloads) set."""
    reason = slurm_cluster.unavailable_reason()
    if reason:
        skip_or_fail(reason, "SPINEMETS_REQUIRE_SLURM")
    one = slurm_cluster.OneNodeSlurm()
    try:
        one.start()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SLURM_CONF", str(one.conf))
            mp.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p))
            yield one
    finally:
        one.stop()
        shutil.rmtree(one.root, ignore_errors=True)
