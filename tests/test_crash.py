"""A killed import leaves nothing that the next run does not clear, and the rerun gives the same bytes."""

import os
import signal
import subprocess
import sys
import time

import numpy as np

from spinemets.cohort import dataset

from conftest import digests, make_ct, vertebra_labelmap, write_case


def test_sigkill_mid_import_then_rerun_is_byte_identical(tmp_path):
    root = tmp_path / "cohort"
    for index in range(12):
        ct = make_ct(shape=(96, 96, 60), seed=index)
        lesion = np.zeros(ct.GetSize()[::-1], dtype=bool)
        lesion[10:14, 20:30, 20:30] = True
        write_case(root / f"case_{index:03d}", ct, vertebra_labelmap(ct), [("lytic", lesion)])
    manifest = tmp_path / "m.csv"
    dataset.scan(root, manifest)
    reference = dataset.import_dataset(manifest, "metastases", tmp_path / "reference")

    raw = tmp_path / "raw"
    command = [sys.executable, "-m", "spinemets.cli", "import", "--manifest", str(manifest),
               "--stage", "metastases", "--out", str(raw)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = raw / ".partial-Dataset502_Metastases" / "labelsTr"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if staging.exists() and len(list(staging.iterdir())) >= 3:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the import finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert list(raw.glob(".partial-*")), "the kill should have left a staging folder behind"
    assert not (raw / "Dataset502_Metastases").exists()

    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert digests(raw / "Dataset502_Metastases") == digests(reference)
    assert not [p for p in raw.rglob("*") if p.name.startswith(".partial-")]
