"""The viewer of a live notebook (``interactive=True``), run once in a real kernel.

The optional extra (``viewer``: ipyniivue and the widget packages it needs, ``tests/viewer-extra.txt``)
is installed by ``make test`` into a folder of its own (``build/viewer-extra``, a layer put in front
of the kernel's ``PYTHONPATH``), so the main environment stays as lean as a user's without the
extra and the test reaches no registry. A notebook then
builds :func:`spinemets.report.viewer.live_view` for a CT and the two label maps, and the kernel returns the
widget: its view (the widget mime type), its three layers and their colour tables.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, skip_or_fail

#: The extra and the widget packages under it (installed by ``make test`` into ``build/viewer-extra``).
REQUIREMENTS = REPO / "tests" / "viewer-extra.txt"


def viewer_layer() -> Path:
    """The extra as ``make test`` installed it into ``build/viewer-extra``; the test skips (fails
    with ``SPINEMETS_REQUIRE_TOOLS=1``, as in CI) where it is missing or older than the list: no test
    installs anything."""
    layer = REPO / "build" / "viewer-extra"
    stamp = layer / ".installed"
    if stamp.is_file() and stamp.read_text() == REQUIREMENTS.read_text():
        return layer
    reason = f"the viewer extra is not installed in {layer} (or not from the current {REQUIREMENTS.name}); run `make test`"
    skip_or_fail(reason, "SPINEMETS_REQUIRE_TOOLS")


def write_case(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    ct = np.full((24, 32, 32), -800, np.int16)
    ct[4:20, 10:22, 10:22] = 400
    vertebrae = np.zeros(ct.shape, np.uint8)
    vertebrae[4:12, 10:22, 10:22], vertebrae[12:20, 10:22, 10:22] = 20, 21  # L1, L2
    lesions = np.zeros(ct.shape, np.uint8)
    lesions[6:9, 14:17, 14:17], lesions[14:17, 14:17, 14:17] = 1, 2
    paths = {}
    for name, array in (("ct", ct), ("vertebrae", vertebrae), ("lesions", lesions)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((1.0, 1.0, 2.5))
        paths[name] = folder / f"{name}.nii.gz"
        sitk.WriteImage(image, str(paths[name]))
    return paths


@pytest.mark.slow
def test_live_viewer_is_built_for_our_images_in_a_kernel_with_the_extra(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    layer = viewer_layer()
    paths = write_case(tmp_path / "case")
    code = (
        "import json\n"
        "from spinemets.report import viewer\n"
        f"widget = viewer.live_view({str(paths['ct'])!r}, vertebrae={str(paths['vertebrae'])!r}, "
        f"lesions={str(paths['lesions'])!r})\n"
        "print(json.dumps({'module': type(widget).__module__, 'layers': [v.name for v in widget.volumes],\n"
        "                  'luts': [len(v.colormap_label.lut) if v.colormap_label else 0 for v in widget.volumes]}))\n"
        "widget"
    )
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(layer), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = notebook.cells[0].outputs
    assert not [o for o in outputs if o.output_type == "error"], outputs
    printed = json.loads("".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout"))
    assert printed["module"].startswith("ipyniivue")
    assert printed["layers"] == ["CT", "vertebrae", "lesions"]
    assert printed["luts"][0] == 0 and printed["luts"][1] == 4 * 26 and printed["luts"][2] == 4 * 3  # RGBA per label
    views = [o for o in outputs if o.output_type == "execute_result" and "application/vnd.jupyter.widget-view+json" in o.data]
    assert views, "the kernel returned the widget's view"


def test_live_viewer_without_the_extra_says_how_to_install_it(tmp_path, monkeypatch):
    from spinemets.report import viewer
    from spinemets.errors import SpinemetsError

    monkeypatch.setitem(sys.modules, "ipyniivue", None)  # as where the extra is not installed
    paths = write_case(tmp_path / "case")
    with pytest.raises(SpinemetsError, match=r"pip install -e '\.\[viewer\]'"):
        viewer.live_view(paths["ct"])
    with pytest.raises(SpinemetsError, match=r"missing\.nii\.gz: not found"):  # the files are checked first
        viewer.live_view(paths["ct"], lesions=tmp_path / "missing.nii.gz")
