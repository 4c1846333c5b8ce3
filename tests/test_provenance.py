"""spinemets.provenance: the common part of every output's record."""

import sys

from spinemets import __version__, provenance


def test_every_record_says_what_produced_it_when_and_with_which_versions(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/spinemets", "predict", "--input", "my cts"])
    record = provenance.provenance("spinemets.x", parameters={"a": 1})
    assert list(record)[:4] == ["produced_by", "command", "created", "versions"]
    assert record["produced_by"] == "spinemets.x" and record["parameters"] == {"a": 1}
    assert record["command"] == "spinemets predict --input 'my cts'"
    assert record["versions"]["spinemets"] == __version__ and record["versions"]["python"]
    assert {"nnunetv2", "torch", "SimpleITK", "numpy"} <= set(record["versions"])
    assert record["created"].endswith("+00:00")
