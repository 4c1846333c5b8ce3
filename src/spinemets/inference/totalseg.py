"""TotalSegmentator as a ready-made stage 1: its public CT model labels the vertebrae.

A group that has only the metastasis release (38 CTs, no vertebra labels) can run the whole
two-stage pipeline with TotalSegmentator (Wasserthal et al., Radiology: AI 2023; test Dice
0.87-0.98 per vertebra) in place of a trained vertebra model:
``spinemets predict --vertebrae totalsegmentator`` (the optional extra
``pip install 'spinemets[totalsegmentator]'``).

:class:`TotalSegmentatorStage` runs TotalSegmentator's own entry point (its ``TotalSegmentator``
command, task ``total``, ``--roi_subset`` of the vertebrae and the sacrum, one multilabel file) on
each CT in a child process, so that the nnU-Net variables TotalSegmentator sets for itself stay out
of this process, and maps its labels onto ours with the built-in mapping
(:data:`spinemets.labels.TOTALSEGMENTATOR_TOTAL_TO_VERTEBRAE`: its ``vertebrae_S1`` and ``sacrum``
become our Sacrum, as ``spinemets scan --mapping totalsegmentator`` does). Its weights are
TotalSegmentator's business: on first use it downloads them from its own servers into
``TOTALSEG_HOME_DIR`` (default ``~/.totalsegmentator``), as it always does; its settings (such as
its anonymous usage statistics, ``send_usage_stats`` in that folder's ``config.json``) are the
user's. A stage of this kind has no training domain record: no domain check is made for stage 1.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from spinemets.errors import SpinemetsError, unknown_choice
from spinemets.labels import TOTALSEGMENTATOR_TOTAL_TO_VERTEBRAE, VERTEBRA_SOURCES, VERTEBRAE
from spinemets.paths import workspace_of
from spinemets.training.programs import program_path, run_nnunet

log = logging.getLogger(__name__)

#: TotalSegmentator's task and console script.
TASK = "total"
PROGRAM = "TotalSegmentator"
#: The structures asked of TotalSegmentator (its names; ``--roi_subset``): the sacrum, its separate S1,
#: and C1-L5, the structures the built-in mapping turns into our 25 labels.
ROI_SUBSET: tuple[str, ...] = ("sacrum", "vertebrae_S1", *(f"vertebrae_{name}" for name in VERTEBRAE[:-1]))
#: Our device names -> TotalSegmentator's ``--device``.
DEVICES = {"cpu": "cpu", "cuda": "gpu", "mps": "mps"}
INSTALL_HINT = "pip install 'spinemets[totalsegmentator]' (or pip install TotalSegmentator)"


def check_source(source: str) -> dict | None:
    """The settings of a vertebra source (:data:`spinemets.labels.VERTEBRA_SOURCES`); an unknown one is an error naming the known ones."""
    if not isinstance(source, str) or source not in VERTEBRA_SOURCES:
        raise unknown_choice("vertebra source", source, VERTEBRA_SOURCES, "--vertebrae")
    return VERTEBRA_SOURCES[source]


def installed_version() -> str:
    """TotalSegmentator's installed version; a clear error when it is not installed."""
    if importlib.util.find_spec("totalsegmentator") is None:
        raise SpinemetsError(f"--vertebrae totalsegmentator: TotalSegmentator is not installed; {INSTALL_HINT}")
    try:
        return importlib.metadata.version("TotalSegmentator")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def weights_folder() -> Path:
    """The folder TotalSegmentator reads its weights from (its own rule: ``TOTALSEG_WEIGHTS_PATH``, else
    ``TOTALSEG_HOME_DIR``'s ``nnunet/results``, else ``~/.totalsegmentator``'s)."""
    from totalsegmentator.config import get_weights_dir

    return Path(get_weights_dir())


def to_vertebrae(labels: np.ndarray, where: str = "TotalSegmentator output") -> np.ndarray:
    """A label map of TotalSegmentator's ``total`` task as our vertebra labels (1-25; everything else 0)."""
    low, high = (labels.min(), labels.max()) if labels.size else (0, 0)
    if low < 0 or high > 255:
        raise SpinemetsError(f"{where}: label values {low}..{high} are no TotalSegmentator 'total' labels (0-117)")
    table = np.zeros(256, dtype=np.uint8)
    for theirs, ours in TOTALSEGMENTATOR_TOTAL_TO_VERTEBRAE.items():
        table[theirs] = ours
    return table[labels if np.issubdtype(labels.dtype, np.integer) else labels.astype(np.int64)]


class TotalSegmentatorStage:
    """Stage 1 by TotalSegmentator: ``segment_image(image)`` gives our vertebra labels on the CT's grid.

    ``fast`` picks its 3 mm model; ``device`` is ours (``cpu``, ``cuda``, ``mps``); its output goes where
    nnU-Net's does (:func:`spinemets.training.programs.run_nnunet`: the console, or
    ``logs/TotalSegmentator.log`` of ``workspace`` under ``SPINEMETS_TOOL_OUTPUT=log``).
    """

    #: No training domain record and no nnU-Net postprocessing: TotalSegmentator has its own.
    domain = None
    postprocessing = None

    def __init__(self, device: str = "cpu", fast: bool = False, workspace=None):
        if device not in DEVICES:
            raise unknown_choice("device", device, DEVICES, "--device")
        self.version = installed_version()
        self.device, self.fast, self.workspace = device, bool(fast), workspace_of(workspace)
        mode = VERTEBRA_SOURCES["totalsegmentator-fast" if fast else "totalsegmentator"]["mode"]
        #: What the provenance and the results page say of stage 1.
        self.models = [{"model": f"TotalSegmentator {self.version}", "task": TASK, "mode": mode,
                        "roi_subset": "C1-L5, S1 and sacrum (S1 and sacrum mapped to our Sacrum)",
                        "weights": str(weights_folder())}]

    def arguments(self, ct: Path, out: Path) -> list[str]:
        """The ``TotalSegmentator`` command line for one CT: one multilabel file of the vertebrae and sacrum."""
        args = ["-i", str(ct), "-o", str(out), "--ml", "--task", TASK, "--device", DEVICES[self.device],
                "--roi_subset", *ROI_SUBSET]
        return args + (["--fast"] if self.fast else [])

    def segment_image(self, image: sitk.Image, name: str = "CT") -> np.ndarray:
        """Our vertebra labels (z, y, x) of ``image`` from TotalSegmentator, on the image's grid."""
        try:
            program_path(PROGRAM, INSTALL_HINT)  # where run_nnunet looks: refused before the CT is copied
        except SpinemetsError as exc:
            raise SpinemetsError(f"{name}: {exc}") from None
        with tempfile.TemporaryDirectory(prefix="spinemets-totalseg-") as tmp:
            ct, out = Path(tmp) / "ct.nii.gz", Path(tmp) / "vertebrae.nii.gz"
            sitk.WriteImage(image, str(ct))
            try:
                run_nnunet(PROGRAM, self.arguments(ct, out), self.workspace)
            except SpinemetsError as exc:  # its message names the temporary copy: say which CT it was
                raise SpinemetsError(f"{name}: {exc}") from None
            if not out.is_file():
                raise SpinemetsError(f"{name}: TotalSegmentator wrote no label map (expected {out.name})")
            seg = sitk.ReadImage(str(out))
        if seg.GetSize() != image.GetSize() or not _same_grid(seg, image):
            # TotalSegmentator returns its map on the input's grid; a small difference of the stored
            # geometry (NIfTI keeps single precision) is put right by nearest-neighbour resampling
            seg = sitk.Resample(seg, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, seg.GetPixelID())
        return to_vertebrae(sitk.GetArrayFromImage(seg), f"{name}: TotalSegmentator output")


def _same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-3) -> bool:
    return (np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol) and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))
