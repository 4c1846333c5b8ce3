import pytest

from spinemets import labels
from spinemets.errors import SpinemetsError


def test_vertebra_table_order_and_values():
    table = labels.labels("vertebrae")
    assert table["background"] == 0
    assert [table[n] for n in ("C1", "C7", "T1", "T12", "L1", "L5", "Sacrum")] == [1, 7, 8, 19, 20, 24, 25]
    assert len(labels.foreground_labels("vertebrae")) == 25
    assert labels.labels("metastases") == {"background": 0, "lytic": 1, "sclerotic": 2}


@pytest.mark.parametrize("name,expected", [
    ("C1", 1), ("vertebrae_C1", 1), ("Vertebra C1", 1), ("VERTEBRAE-L5", 24), ("l5", 24),
    ("T12 vertebra", 19), ("sacrum", 25), ("vertebrae_S1", 25),
])
def test_vertebra_aliases(name, expected):
    assert labels.resolve_segment_name(name, "vertebrae") == expected


@pytest.mark.parametrize("name,expected", [
    ("Lytic", 1), ("osteolytic", 1), ("Osteolytic metastasis", 1),
    ("Sclerotic", 2), ("blastic", 2), ("osteoblastic", 2), ("Osteosclerotic", 2),
])
def test_lesion_aliases(name, expected):
    assert labels.resolve_segment_name(name, "metastases") == expected


def test_unknown_names_are_listed_with_the_known_ones():
    with pytest.raises(SpinemetsError) as err:
        labels.resolve_segment_names(["L1", "kidney", "Segment_7"], "vertebrae", source="x.seg.nrrd")
    message = str(err.value)
    assert "x.seg.nrrd" in message and "'kidney'" in message and "'Segment_7'" in message
    assert "C1" in message and "Sacrum" in message


def test_mapping_file_adds_and_ignores(tmp_path):
    path = tmp_path / "map.yaml"
    path.write_text('"Segment_1": lytic\nribs: null\n"Tumour A": osteoblastic\n')
    mapping = labels.read_mapping_file(path)
    assert labels.resolve_segment_name("Segment_1", "metastases", mapping) == 1
    assert labels.resolve_segment_name("segment 1", "metastases", mapping) == 1
    assert labels.resolve_segment_name("ribs", "metastases", mapping) is None
    assert labels.resolve_segment_name("Tumour A", "metastases", mapping) == 2
    assert labels.resolve_segment_name("lytic", "metastases", mapping) == 1  # built-ins still apply


def test_mapping_to_an_unknown_label_is_an_error(tmp_path):
    path = tmp_path / "map.yaml"
    path.write_text("Segment_1: kidney\n")
    with pytest.raises(SpinemetsError, match="'kidney' is not a label of the metastases stage"):
        labels.resolve_segment_name("Segment_1", "metastases", labels.read_mapping_file(path))


@pytest.mark.parametrize("text,message", [("[1, 2]", "must map"), ("a: [1]", "expected a label name"),
                                          ("a: b: c", "not valid YAML")])
def test_bad_mapping_files(tmp_path, text, message):
    path = tmp_path / "map.yaml"
    path.write_text(text)
    with pytest.raises(SpinemetsError, match=message):
        labels.read_mapping_file(path)


def test_totalsegmentator_map_matches_its_label_names():
    # TotalSegmentator "total" task: 25 sacrum, 26 vertebrae_S1, 27 L5 ... 31 L1, 32 T12 ... 43 T1, 44 C7 ... 50 C1
    ts = labels.NAMED_MAPPINGS["totalsegmentator"]
    assert ts[25] == ts[26] == "Sacrum"
    assert (ts[27], ts[31], ts[32], ts[43], ts[44], ts[50]) == ("L5", "L1", "T12", "T1", "C7", "C1")
    assert len(set(ts.values())) == 25


def test_label_values_without_mapping_must_be_labels():
    with pytest.raises(SpinemetsError, match=r"label values \[26\]"):
        labels.map_label_values([1, 26], "vertebrae", None, "m.nii.gz")
    assert labels.map_label_values([3, 7], "metastases", {3: "lytic"}, "m.nii.gz") == {3: 1, 7: 0}


def test_colours_distinguish_neighbours():
    colours = [labels.colour("vertebrae", n) for n in labels.VERTEBRAE]
    assert all(a != b for a, b in zip(colours, colours[1:]))
    assert all(0 <= c <= 1 for rgb in colours for c in rgb)


def test_unknown_stage():
    with pytest.raises(SpinemetsError, match="unknown stage 'ribs'"):
        labels.labels("ribs")


def test_numbered_lesion_segments():
    assert labels.resolve_segment_name("Lytic 2", "metastases") == 1
    assert labels.resolve_segment_name("sclerotic_13", "metastases") == 2
    with pytest.raises(KeyError):
        labels.resolve_segment_name("L1 2", "vertebrae")
