"""spinemets.report.figures: the colour maps and the display window that every figure and notebook shares."""

import numpy as np
import pytest

from spinemets.report import figures

from spinemets import labels
from spinemets.errors import SpinemetsError


def test_label_colormap_uses_the_label_table_with_a_transparent_background():
    cmap = figures.label_colormap("metastases", 0.9)
    assert cmap.N == 3
    assert tuple(cmap(0)) == (0.0, 0.0, 0.0, 0.0)
    assert np.allclose(cmap(1)[:3], labels.LESION_COLOURS["lytic"]) and cmap(1)[3] == 0.9
    assert np.allclose(cmap(2)[:3], labels.LESION_COLOURS["sclerotic"])
    vert = figures.label_colormap("vertebrae")
    assert vert.N == 26 and np.allclose(vert(labels.STAGES["vertebrae"]["labels"]["L1"])[:3],
                                        labels.colour("vertebrae", "L1"))


def test_one_ct_window():
    assert figures.CT_WINDOW == {"cmap": "gray", "vmin": -250, "vmax": 1250}


def _two_vertebrae_and_a_lesion(lesion_voxels=None):
    """Label 8 (T1) low and 9 (T2) high along z; a lytic lesion inside T2; spacing x, y, z in mm."""
    vert = np.zeros((30, 20, 24), dtype=np.uint8)
    vert[3:12, 5:15, 6:18] = 8
    vert[16:26, 5:15, 6:18] = 9
    les = np.zeros_like(vert)
    if lesion_voxels is None:
        les[18:23, 7:11, 8:12] = labels.LYTIC
    else:
        for z, y, x in lesion_voxels:
            les[z, y, x] = labels.SCLEROTIC
    return vert, les, (1.5, 1.5, 2.0)


def _png(fig) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _meshes(fig):
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    return [c for ax in fig.axes for c in ax.collections if isinstance(c, Poly3DCollection)]


def test_render_surfaces_draws_one_mesh_per_label_and_view_in_the_label_colours():
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")
    vert, les, spacing = _two_vertebrae_and_a_lesion()
    fig = figures.render_surfaces((vert, spacing), (les, spacing), style=figures.SurfaceStyle(views=("anterior", "left lateral")))
    meshes = _meshes(fig)
    assert len(meshes) == 2 * 3  # two vertebrae and one lesion, in each of two views
    assert all(len(m.get_facecolor()) > 0 for m in meshes)
    cmap = figures.label_colormap("vertebrae")
    for mesh in meshes:
        stage, value = mesh.spinemets_label
        expected = cmap(value)[:3] if stage == "vertebrae" else figures.label_colormap("metastases")(value)[:3]
        assert np.allclose(mesh.spinemets_colour, expected)
        face = mesh.get_facecolor()[:, :3]  # shaded: a darker or equal multiple of the base colour
        assert np.all(face <= np.asarray(expected) + 1e-6)
    assert {m.spinemets_label for m in meshes} == {("vertebrae", 8), ("vertebrae", 9), ("metastases", 1)}
    plt.close(fig)


def test_render_surfaces_is_deterministic_and_respects_max_faces():
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")
    vert, les, spacing = _two_vertebrae_and_a_lesion()
    figs = [figures.render_surfaces(vert, les, spacing=spacing, style=figures.SurfaceStyle(title="case", max_faces=3000)) for _ in range(2)]
    assert _png(figs[0]) == _png(figs[1])
    faces = sum(len(m.get_facecolor()) for m in _meshes(figs[0]) if m.axes is figs[0].axes[0])
    assert 0 < faces <= 3000
    for fig in figs:
        plt.close(fig)


def test_render_surfaces_reads_files_and_orients_the_anterior_view(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt
    import SimpleITK as sitk
    from mpl_toolkits.mplot3d import proj3d

    matplotlib.use("Agg")
    vert, les, spacing = _two_vertebrae_and_a_lesion()
    vert[16:26, 5:15, 6:12] = 0  # T2 only on the high-x side (patient's left in LPS)
    image = sitk.GetImageFromArray(vert)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(tmp_path / "vertebrae.nii.gz"))
    fig = figures.render_surfaces(tmp_path / "vertebrae.nii.gz", style=figures.SurfaceStyle(views=("anterior",)))
    fig.canvas.draw()
    ax = fig.axes[0]
    centres = {}
    for mesh in _meshes(fig):
        verts = np.concatenate([p.vertices for p in mesh.get_paths()]) if mesh.get_paths() else None
        centres[mesh.spinemets_label[1]] = verts.mean(axis=0)  # projected 2-D (screen) coordinates
    # head up: T2 (higher z) above T1; patient's left (high x) on the right of the image
    assert centres[9][1] > centres[8][1]
    assert centres[9][0] > centres[8][0]
    plt.close(fig)


def test_render_surfaces_without_vertebrae_gives_a_figure_with_a_message():
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")
    fig = figures.render_surfaces(np.zeros((5, 6, 7), dtype=np.uint8), None)
    assert _meshes(fig) == []
    assert any("no vertebrae" in t.get_text() for t in fig.texts)
    assert _png(fig)
    plt.close(fig)


def test_render_surfaces_still_draws_a_one_voxel_lesion():
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")
    vert, les, spacing = _two_vertebrae_and_a_lesion(lesion_voxels=[(20, 10, 12)])
    fig = figures.render_surfaces((vert, spacing), (les, spacing), style=figures.SurfaceStyle(views=("anterior",)))
    lesion = [m for m in _meshes(fig) if m.spinemets_label == ("metastases", labels.SCLEROTIC)]
    assert len(lesion) == 1 and len(lesion[0].get_facecolor()) > 0
    plt.close(fig)


def test_render_surfaces_refuses_an_unknown_view():
    import pytest

    from spinemets.errors import SpinemetsError

    with pytest.raises(SpinemetsError, match="views"):
        figures.render_surfaces(np.zeros((4, 4, 4), dtype=np.uint8), style=figures.SurfaceStyle(views=("superior",)))


# ---------------------------------------------------------------------------------------------
# Error analysis of one case
# ---------------------------------------------------------------------------------------------


def test_choose_error_cases_takes_the_worst_and_the_median_by_lesion_f2():
    import pandas as pd

    rows = [(case, cls, "lesion_fbeta", value) for case, values in
            {"a": (0.9, 0.7), "b": (0.1, 0.3), "c": (0.5, 0.5), "d": (float("nan"), float("nan")), "e": (1.0, 1.0)}.items()
            for cls, value in zip(("lytic", "sclerotic"), values)]
    table = pd.DataFrame(rows + [("b", "lytic", "dice", 0.99)], columns=["case", "class", "metric", "value"])
    assert figures.choose_error_cases(table) == {"worst": "b", "median": "c"}  # d has no F2: left out
    assert figures.choose_error_cases(table[table["case"] == "a"]) == {"worst": "a", "median": "a"}
    assert figures.choose_error_cases(table[table["metric"] == "dice"], metric="lesion_fbeta") == {}


def test_error_analysis_annotates_the_missed_and_false_lesions_and_the_shifted_levels(tmp_path):
    import SimpleITK as sitk

    shape = (40, 16, 16)
    ref_v = np.zeros(shape, np.uint8)
    for i, level in enumerate((14, 15, 16, 17)):  # T7 ... T10, 10 slices each
        ref_v[10 * i:10 * i + 8, 4:12, 4:12] = level
    pred_v = ref_v.copy()
    pred_v[ref_v == 16] = 17  # T9 called T10
    ref_l = np.zeros(shape, np.uint8)
    ref_l[2:5, 6:9, 6:9] = 1  # found (in T7)
    ref_l[22:25, 6:9, 6:9] = 2  # missed (in T9)
    pred_l = np.zeros(shape, np.uint8)
    pred_l[2:5, 6:9, 6:9] = 1
    pred_l[32:34, 6:8, 6:8] = 1  # false (in T10)
    paths = {}
    for name, array in (("ref_v", ref_v), ("ref_l", ref_l), ("case/vertebrae", pred_v), ("case/metastases", pred_l),
                        ("ct", (ref_v > 0) * 700 - 100)):
        image = sitk.GetImageFromArray(array.astype(np.int16 if name == "ct" else np.uint8))
        image.SetSpacing((1.0, 1.0, 2.0))
        paths[name] = tmp_path / f"{name}.nii.gz"
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(paths[name]))
    fig, lesions = figures.error_analysis("case", tmp_path, {"vertebrae": paths["ref_v"], "metastases": paths["ref_l"]},
                                          paths["ct"])
    assert sorted(zip(lesions["outcome"], lesions["class"], lesions["vertebra"])) == [
        ("FN", "sclerotic", "T9"), ("FP", "lytic", "T10"), ("TP", "lytic", "T7")]
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert sum(t.startswith("missed sclerotic") and "(T9)" in t for t in texts) == 2  # sagittal and coronal
    assert sum(t.startswith("false lytic") and "(T10)" in t for t in texts) == 2
    assert "T9 → T10" in texts and "T7" in texts and "T8" in texts
    assert "1 lesions found, 1 missed, 1 false" in fig._suptitle.get_text()
    assert "(1 wrong)" in fig.axes[2].get_title()
    with pytest.raises(SpinemetsError, match="differ in shape"):
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 5, 5), np.uint8)), str(paths["ref_l"]))
        figures.error_analysis("case", tmp_path, {"vertebrae": paths["ref_v"], "metastases": paths["ref_l"]})


def test_surface_of_a_fragmented_label_thinner_than_the_step_is_still_drawn():
    """A label predicted as scattered fragments (tests/data/fragmented_label.npz: vertebra 16 of a
    case of the rehearsal's release, 140 voxels spread over 96 x 34 x 41) has no surface at a coarse
    marching-cubes step; the rendering takes a finer step for it instead of failing."""
    from pathlib import Path

    saved = np.load(Path(__file__).parent / "data" / "fragmented_label.npz")
    shape = tuple(int(n) for n in saved["shape"])
    mask = np.unpackbits(saved["bits"])[:int(np.prod(shape))].reshape(shape).astype(bool)
    assert mask.sum() == 140
    triangles, normals = figures._surface(mask, np.array([2.0, 1.0, 1.0]), step=5)
    assert len(triangles) > 0 and normals.shape == (len(triangles), 3)
    volume = np.zeros((shape[0] + 4, shape[1] + 4, shape[2] + 4), np.uint8)
    volume[2:-2, 2:-2, 2:-2][mask] = 16
    volume[2:-2, 2:6, 2:6] = 20  # a solid neighbour, so that the face budget forces a coarse step
    fig = figures.render_surfaces((volume, (1.0, 1.0, 2.0)), style=figures.SurfaceStyle(max_faces=300))
    assert any(getattr(c, "spinemets_label", None) == ("vertebrae", 16) for ax in fig.axes for c in ax.collections)


def test_three_planes_go_through_the_slice_with_the_most_lesion_voxels():
    import SimpleITK as sitk

    ct = np.full((20, 30, 40), -1000, np.int16)
    vert = np.zeros(ct.shape, np.uint8)
    vert[5:15, 10:20, 10:30] = 20
    met = np.zeros(ct.shape, np.uint8)
    met[12, 14:16, 21:25] = 1
    met[8, 15, 22] = 2
    images = []
    for array in (ct, vert, met):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.8, 0.8, 2.0))
        images.append(image)
    fig = figures.three_planes(*images, case="c1")
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["c1: axial", "c1: sagittal", "c1: coronal"]
    axial = axes[0].images[0].get_array()
    assert axial.shape == (30, 40)  # one axial slice, y by x
    np.testing.assert_array_equal(axes[0].images[2].get_array(), met[12])  # the slice with the most lesion voxels
    assert axes[1].images[0].get_array().shape == (20, 30) and axes[2].images[0].get_array().shape == (20, 40)
    plain = figures.three_planes(images[0])
    assert [ax.get_title() for ax in plain.axes] == ["axial", "sagittal", "coronal"] and len(plain.axes[0].images) == 1


def test_dice_per_vertebra_takes_per_case_rows_or_a_dice_table():
    import pandas as pd

    per_case = pd.DataFrame({"case": ["a", "b", "a", "b", "a"], "class": ["L1", "L1", "T12", "T12", "L1"],
                             "metric": ["dice", "dice", "dice", "dice", "iou"], "value": [0.9, 0.7, 0.5, np.nan, 0.1]})
    fig = figures.dice_per_vertebra(per_case)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["T12", "L1"]  # anatomical order, those with a value
    points = sorted(tuple(np.round(o, 3)) for c in ax.collections for o in c.get_offsets())
    assert [p[1] for p in points] == [0.5, 0.7, 0.9]  # the Dice rows only, NaN left out
    table = pd.DataFrame({"vertebra": ["T1", "T2"], "dice": [0.8, 0.6]})
    fig = figures.dice_per_vertebra(table, ["T1", "T2", "T3"], "external")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["T1", "T2", "T3"]
    assert fig.axes[0].get_title() == "external"
