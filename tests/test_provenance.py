"""The common part of every provenance record (spinemets.provenance)."""

from __future__ import annotations

import sys
from importlib import metadata

from spinemets import provenance


def test_versions_are_what_importlib_metadata_says():
    found = provenance.versions()
    for name in provenance.VERSIONED:
        try:
            expected = metadata.version(name)
        except metadata.PackageNotFoundError:
            expected = None
        assert found[name] == expected, name


def test_versions_from_folder_names_follow_the_import_path_and_fall_back(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    for folder, version in ((first, "1.2.3"), (second, "9.9.9")):
        (folder / f"Some_Package-{version}.dist-info").mkdir(parents=True)
    (first / "not-a-dist-info").mkdir()
    monkeypatch.setattr(sys, "path", [str(tmp_path / "missing"), str(first), str(second)])
    assert provenance._dist_info_versions() == {"some_package": "1.2.3"}  # the first on the path, as import finds it
    monkeypatch.setattr(provenance, "VERSIONED", ("some-package", "absent-package"))
    found = provenance.versions()
    assert found["some-package"] == "1.2.3" and found["absent-package"] is None
