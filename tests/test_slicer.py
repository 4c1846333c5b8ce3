
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from spinemets.formats import images, slicer

from spinemets import labels
from spinemets.errors import SpinemetsError

from conftest import REPO, make_ct

MAPPING = REPO / "tests" / "data" / "slicerio_mapping.yaml"


def _zyx(mask_ijk):
    return np.asarray(mask_ijk).transpose(2, 1, 0)


def test_real_slicer_file_imports_onto_the_ct(slicerio_data):
    ct = images.read_image(slicerio_data / "CTChest4.nrrd")
    mapping = labels.read_mapping_file(MAPPING)
    labelmap, report = slicer.labelmap_from_segmentation(
        slicerio_data / "Segmentation.seg.nrrd", ct, "metastases", mapping)
    seg = slicerio.read_segmentation(str(slicerio_data / "Segmentation.seg.nrrd"))
    expected = _zyx(slicerio.segment_mask(seg, "Segment_3")).astype(np.uint8) * 2
    assert np.array_equal(sitk.GetArrayFromImage(labelmap), expected)
    assert report["segments"] == [{"name": "thoracic vertebral column", "label": 2, "voxels": 2712}]
    assert sorted(report["ignored"]) == sorted(["ribs", "cervical vertebral column", "lumbar vertebral column",
                                                "right lung", "left lung", "tissue"])


def test_real_overlapping_file_uses_layers_and_the_overlap_rule(slicerio_data):
    ct = images.read_image(slicerio_data / "CTChest4.nrrd")
    mapping = {"overlapping sphere": "lytic", "tissue": "sclerotic"}
    mapping.update({n: None for n in ("ribs", "cervical vertebral column", "thoracic vertebral column",
                                       "lumbar vertebral column", "right lung", "left lung")})
    path = slicerio_data / "SegmentationOverlapping.seg.nrrd"
    labelmap, report = slicer.labelmap_from_segmentation(path, ct, "metastases", mapping)
    seg = slicerio.read_segmentation(str(path))
    assert seg["voxels"].ndim == 4  # two layers
    sphere = _zyx(slicerio.segment_mask(seg, "overlapping sphere"))
    tissue = _zyx(slicerio.segment_mask(seg, "tissue"))
    assert (sphere & tissue).sum() > 0
    result = sitk.GetArrayFromImage(labelmap)
    # the smaller segment (the sphere) wins where the two overlap
    assert np.array_equal(result == 1, sphere)
    assert np.array_equal(result == 2, tissue & ~sphere)
    assert report["contested_voxels"] == int((sphere & tissue).sum())


def test_round_trip_is_exact_and_cropped(tmp_path):
    ct = make_ct(shape=(30, 26, 18))
    array = np.zeros(ct.GetSize()[::-1], dtype=np.uint8)
    array[4:9, 6:12, 10:20] = labels.STAGES["vertebrae"]["labels"]["L1"]
    array[9:13, 6:12, 10:20] = labels.STAGES["vertebrae"]["labels"]["T12"]
    array[2:4, 8:10, 12:14] = labels.STAGES["vertebrae"]["labels"]["L2"]
    labelmap = images.image_from_array(array, ct)
    path = slicer.segmentation_from_labelmap(labelmap, tmp_path / "v.seg.nrrd", "vertebrae")
    seg = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in seg["segments"]] == ["T12", "L1", "L2"]
    assert seg["segments"][0]["color"] == pytest.approx(list(labels.colour("vertebrae", "T12")), abs=1e-6)
    assert seg["voxels"].shape == (10, 6, 11)  # cropped to the union extent, i-j-k order
    assert seg["referenceImageExtentOffset"] == [10, 6, 2]
    back, report = slicer.labelmap_from_segmentation(path, ct, "vertebrae")
    assert np.array_equal(sitk.GetArrayFromImage(back), array)
    assert report["contested_voxels"] == 0


def test_overlapping_segments_go_to_a_second_layer(tmp_path):
    ct = make_ct()
    a = np.zeros(ct.GetSize()[::-1], dtype=bool)
    b = a.copy()
    a[2:6, 2:6, 2:6] = True
    b[4:8, 4:8, 4:8] = True
    path = slicer.write_segments(tmp_path / "m.seg.nrrd", ct, [{"name": "lytic", "mask": a},
                                                               {"name": "sclerotic", "mask": b}])
    seg = slicerio.read_segmentation(str(path))
    assert seg["voxels"].ndim == 4 and [s["layer"] for s in seg["segments"]] == [0, 1]
    back, report = slicer.labelmap_from_segmentation(path, ct, "metastases")
    result = sitk.GetArrayFromImage(back)
    assert report["contested_voxels"] == 8
    # equal sizes: the higher label value (sclerotic) wins the contested voxels
    assert np.array_equal(result == 2, b) and np.array_equal(result == 1, a & ~b)


def _seg_on(ct, tmp_path, name="m.seg.nrrd"):
    mask = np.zeros(ct.GetSize()[::-1], dtype=bool)
    mask[3:6, 4:8, 5:9] = True
    return slicer.write_segments(tmp_path / name, ct, [{"name": "lytic", "mask": mask}])


@pytest.mark.parametrize("change,message", [
    (lambda im: im.SetSpacing((1.0, 1.2, 2.5)), "voxel spacing"),
    (lambda im: im.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1)), "axis directions differ"),
    (lambda im: im.SetOrigin((-10.75, 20.0, -300.0)), "between CT voxels"),
    (lambda im: im.SetOrigin((-10.0 + 1.5 * 20, 20.0, -300.0)), "outside the CT"),
])
def test_geometry_mismatch_is_an_error(tmp_path, change, message):
    ct = make_ct()
    other = make_ct()
    change(other)
    path = _seg_on(other, tmp_path)
    with pytest.raises(SpinemetsError, match=message) as err:
        slicer.labelmap_from_segmentation(path, ct, "metastases", ct_path="ct.nrrd")
    assert str(path) in str(err.value)


def test_mask_shifted_by_whole_voxels_is_placed(tmp_path):
    ct = make_ct()
    shifted = make_ct(origin=(-10.0 + 1.5 * 3, 20.0 - 1.2 * 2, -300.0 + 2.5))
    path = _seg_on(shifted, tmp_path)
    back, _ = slicer.labelmap_from_segmentation(path, ct, "metastases")
    result = sitk.GetArrayFromImage(back)
    expected = np.zeros_like(result)
    expected[4:7, 2:6, 8:12] = 1
    assert np.array_equal(result, expected)


def test_corrupt_and_truncated_files(tmp_path):
    ct = make_ct()
    good = _seg_on(ct, tmp_path)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.seg.nrrd"
    truncated.write_bytes(data[: len(data) - 40])
    garbage = tmp_path / "garbage.seg.nrrd"
    garbage.write_bytes(b"this is not a segmentation")
    for path in (truncated, garbage):
        with pytest.raises(SpinemetsError, match="cannot read 3D Slicer segmentation") as err:
            slicer.labelmap_from_segmentation(path, ct, "metastases")
        assert str(path) in str(err.value)
    with pytest.raises(SpinemetsError, match="not found"):
        slicer.labelmap_from_segmentation(tmp_path / "missing.seg.nrrd", ct, "metastases")


def test_written_files_are_gzip_nrrd_and_deterministic(tmp_path):
    ct = make_ct()
    a, b = _seg_on(ct, tmp_path, "a.seg.nrrd"), _seg_on(ct, tmp_path, "b.seg.nrrd")
    assert a.read_bytes() == b.read_bytes()
    assert b"encoding: gzip" in a.read_bytes()[:2000]
    assert not list(tmp_path.glob(".partial-*"))


def test_labelmap_with_foreign_values_is_refused(tmp_path):
    ct = make_ct()
    array = np.zeros(ct.GetSize()[::-1], dtype=np.uint8)
    array[1, 1, 1] = 7
    with pytest.raises(SpinemetsError, match=r"label values \[7\]"):
        slicer.segmentation_from_labelmap(images.image_from_array(array, ct), tmp_path / "x.seg.nrrd", "metastases")


def test_cropped_masks_with_offsets_and_the_write_date(tmp_path):
    ct = make_ct()
    full = np.zeros(ct.GetSize()[::-1], dtype=bool)
    full[3:6, 4:8, 5:9] = True
    a = slicer.write_segments(tmp_path / "a.seg.nrrd", ct, [{"name": "lytic", "mask": full}])
    b = slicer.write_segments(tmp_path / "b.seg.nrrd", ct,
                              [{"name": "lytic", "mask": full[2:7, 3:9, 4:10], "offset": (2, 3, 4)}])
    assert a.read_bytes() == b.read_bytes()
    assert b"# on 20" not in a.read_bytes()[:1024]  # no write date: equal data give equal bytes
    with pytest.raises(SpinemetsError, match="outside the reference image"):
        slicer.write_segments(tmp_path / "c.seg.nrrd", ct, [{"name": "lytic", "mask": full[2:7], "offset": (14, 0, 0)}])
