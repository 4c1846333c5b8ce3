"""spinemets.formats.images: path checks, the case-ID rule, the output guards, and what ITK lets through silently."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from spinemets import cli

from spinemets.formats import images
from spinemets import fileio
from spinemets.errors import SpinemetsError


@pytest.mark.parametrize("case_id", ["case_001", "A", "0", "sub-01_ses.2", "x" * fileio.CASE_ID_MAX])
def test_valid_case_ids(case_id):
    assert fileio.case_id_problem(case_id) is None
    assert fileio.check_case_id(case_id, "m.csv") == case_id


@pytest.mark.parametrize("case_id, words", [
    ("", "empty case ID"), ("../esc", "must start"), (".hidden", "must start"), ("a/b", "must start"),
    ("a b", "must start"), ("ü", "must start"), ("-x", "must start"), ("case.", "not end with '.'"),
    ("x" * (fileio.CASE_ID_MAX + 1), "longer than"), (3, "not text"), ("a\nb", "must start"),
])
def test_invalid_case_ids_are_refused_naming_the_source(case_id, words):
    assert words in fileio.case_id_problem(case_id)
    with pytest.raises(SpinemetsError, match=r"^m\.csv: "):
        fileio.check_case_id(case_id, "m.csv")


def test_inside_refuses_paths_that_leave_the_root(tmp_path):
    assert fileio.inside(tmp_path, "imagesTr/a_0000.nii.gz") == tmp_path / "imagesTr" / "a_0000.nii.gz"
    for bad in ("../x", "a/../../x", "/etc/passwd"):
        with pytest.raises(SpinemetsError, match="would lie outside"):
            fileio.inside(tmp_path, bad)
    (tmp_path / "link").symlink_to(tmp_path.parent)
    with pytest.raises(SpinemetsError, match="would lie outside"):
        fileio.inside(tmp_path, "link/x")


def test_path_checks_say_what_stands_there(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    (tmp_path / "broken").symlink_to(tmp_path / "gone")
    cases = [
        (fileio.require_file, "d", "is a folder; expected a file"),
        (fileio.require_file, "broken", "is a broken symbolic link"),
        (fileio.require_file, "missing", "not found"),
        (fileio.require_file, "f/under", "f is a file, not a folder"),
        (fileio.require_dir, "f", "is a file; expected a folder"),
        (fileio.check_output_file, "d", "is an existing folder"),
        (fileio.check_output_file, "f/sub/x.csv", "lies under"),
        (fileio.check_output_dir, "f", "is an existing file"),
        (fileio.check_output_dir, "broken", "broken symbolic link"),
    ]
    for check, rel, words in cases:
        with pytest.raises(SpinemetsError) as err:
            check(tmp_path / rel)
        assert str(err.value).startswith(str(tmp_path / rel) + ": ") and words in str(err.value), (rel, err.value)
    assert fileio.require_file(tmp_path / "f") == tmp_path / "f"
    assert fileio.check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checks create nothing


def test_output_folder_removes_what_it_created_when_the_block_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with fileio.output_folder(tmp_path / "a" / "b"):
            raise RuntimeError("boom")
    assert not (tmp_path / "a").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError):
        with fileio.output_folder(tmp_path / "kept"):
            raise RuntimeError("boom")
    assert (tmp_path / "kept").is_dir()
    with fileio.output_folder(tmp_path / "ok" / "x") as folder:
        (folder / "file").write_text("y")
    assert (tmp_path / "ok" / "x" / "file").exists()


def test_atomic_paths_renames_all_or_none(tmp_path):
    with pytest.raises(RuntimeError):
        with fileio.atomic_paths([tmp_path / "a.txt", tmp_path / "b.txt"]) as temps:
            temps[0].write_text("a")
            raise RuntimeError("the second could not be written")
    assert list(tmp_path.iterdir()) == []
    with fileio.atomic_paths([tmp_path / "a.txt", tmp_path / "b.txt"]) as temps:
        for t in temps:
            t.write_text("ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def _float_image(value=None, direction=None):
    array = np.zeros((4, 5, 6), dtype=np.float32)
    if value is not None:
        array[1, 2, 3] = value
    image = sitk.GetImageFromArray(array)
    if direction is not None:
        image.SetDirection(direction)
    return image


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("value, words", [(np.nan, "1 NaN voxel"), (np.inf, "1 infinite voxel"),
                                          (-np.inf, "1 infinite voxel")])
def test_non_finite_voxels_are_refused_in_every_format(tmp_path, suffix, value, words):
    """ITK's NIfTI reader turns NaN and Inf into 0; the second look with nibabel refuses them."""
    path = tmp_path / f"ct{suffix}"
    if suffix.startswith(".nii"):
        import nibabel

        array = np.zeros((6, 5, 4), dtype=np.float32)
        array[3, 2, 1] = value
        nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), str(path))
        assert not np.isfinite(np.asanyarray(nibabel.load(str(path)).dataobj)).all()
    else:
        sitk.WriteImage(_float_image(value), str(path))
    with pytest.raises(SpinemetsError, match=words):
        images.read_image(path, "CT")


def test_a_truncated_nii_gz_is_refused_not_filled_with_zeros(tmp_path):
    array = (np.arange(24 * 20 * 16) % 1000).astype(np.int16).reshape(16, 20, 24)
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SpinemetsError, match=r"ct.nii.gz: cannot read CT \(truncated or corrupt\)"):
        images.read_image(path, "CT")
    raw = tmp_path / "ct.nii"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(raw))
    raw.write_bytes(raw.read_bytes()[:-100])
    with pytest.raises(SpinemetsError, match="ct.nii: CT"):
        images.read_image(raw, "CT")


def test_sheared_directions_are_refused_and_never_written(tmp_path):
    sheared = _float_image(direction=(1, 0, 0, 0.5, 0.866, 0, 0, 0, 1))
    path = tmp_path / "sheared.nrrd"
    sitk.WriteImage(sheared, str(path))  # NRRD keeps the matrix as it is
    with pytest.raises(SpinemetsError, match="sheared.nrrd: CT has a non-orthogonal"):
        images.read_image(path, "CT")
    with pytest.raises(SpinemetsError, match="out.nii.gz: image to write has a non-orthogonal"):
        images.write_image(sheared, tmp_path / "out.nii.gz")
    assert not (tmp_path / "out.nii.gz").exists()
    rotated = _float_image(direction=(0, -1, 0, 1, 0, 0, 0, 0, 1))  # a rotation is fine
    images.write_image(rotated, tmp_path / "rotated.nii.gz")
    assert images.read_image(tmp_path / "rotated.nii.gz").GetDirection() == pytest.approx((0, -1, 0, 1, 0, 0, 0, 0, 1))


def test_error_lines_are_one_line_and_name_the_path():
    assert cli.error_line(SpinemetsError("a.csv: two\nlines")) == "spinemets: error: a.csv: two\\nlines"
    # a tab or line break in a path is shown escaped, not turned into another path
    assert cli.error_line(SpinemetsError("ct\tx.nrrd: bad")) == "spinemets: error: ct\\tx.nrrd: bad"
    err = IsADirectoryError(21, "Is a directory", "/x/out")
    assert cli.error_line(err) == "spinemets: error: /x/out: Is a directory"
    assert cli.error_line(KeyError("k")).startswith("spinemets: error: internal error (KeyError")


def test_the_command_line_turns_os_errors_and_bugs_into_one_line(monkeypatch, capsys):
    def fail_os(**kwargs):
        raise PermissionError(13, "Permission denied", "/data/ct.nii.gz")

    monkeypatch.setattr(images, "convert", fail_os)
    assert cli.main(["convert", "in.nrrd", "--out", "x.nii.gz"]) == cli.EXIT_ERROR
    assert capsys.readouterr().err.strip() == "spinemets: error: /data/ct.nii.gz: Permission denied"

    def fail_bug(**kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(images, "convert", fail_bug)
    assert cli.main(["convert", "in.nrrd", "--out", "x.nii.gz"]) == cli.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "internal error (ZeroDivisionError" in err
