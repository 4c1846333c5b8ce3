"""spinemets.formats.deidentify: stable, private pseudonyms for case IDs."""

import csv

import pytest

from spinemets.formats.deidentify import mapping_path, pseudonymize, read_mapping
from spinemets.errors import SpinemetsError


def test_pseudonyms_are_stable_and_private(tmp_path):
    source, out = tmp_path / "source", tmp_path / "out"
    source.mkdir()
    mapping = mapping_path(source)
    assert mapping.parent == source
    first = pseudonymize(["patient-b", "patient-a", "patient-b"], mapping, out_dir=out)
    assert first == {"patient-b": "sm-0002", "patient-a": "sm-0001"}
    assert pseudonymize(["patient-a"], mapping) == {"patient-a": "sm-0001"}
    text = mapping.read_bytes()
    assert pseudonymize(["patient-a", "patient-b"], mapping) and mapping.read_bytes() == text  # no rewrite
    later = pseudonymize(["patient-0", "patient-a"], mapping)
    assert later == {"patient-0": "sm-0003", "patient-a": "sm-0001"}
    with open(mapping, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows == [
        {"original": "patient-a", "pseudonym": "sm-0001"},
        {"original": "patient-b", "pseudonym": "sm-0002"},
        {"original": "patient-0", "pseudonym": "sm-0003"},
    ]
    assert not out.exists()


def test_pseudonym_mapping_errors(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SpinemetsError, match="must stay beside the source data"):
        pseudonymize(["a"], out / "map.csv", out_dir=out)
    bad = tmp_path / "bad.csv"
    bad.write_text("id,name\n1,2\n")
    with pytest.raises(SpinemetsError, match="not a pseudonym mapping"):
        read_mapping(bad)
    bad.write_text("original,pseudonym\na,sm-0001\nb,sm-0001\n")
    with pytest.raises(SpinemetsError, match="one pseudonym to several identifiers"):
        pseudonymize(["c"], bad)
