"""spinemets.results: the results page's run, its provenance statement, and our numbers beside the paper's."""

from __future__ import annotations

import pandas as pd

from conftest import REPO
from spinemets import results, runner


def _summary(rows):
    return pd.DataFrame(rows, columns=["class", "metric", "aggregate", "value", "ci_low", "ci_high", "n", "n_nan"])


def test_compare_with_paper():
    paper = results.read_paper_results(REPO / "book" / "data" / "paper_results.csv")
    mets = _summary([
        ("lytic", "dice", "mean", 0.654, 0.5, 0.7, 4, 0),
        ("lytic", "dice", "pooled", 0.1, 0.1, 0.1, 4, 0),
        ("lytic", "fbeta", "mean", 0.6, 0.55, 0.65, 4, 0),
        ("sclerotic", "dice", "mean", float("nan"), float("nan"), float("nan"), 0, 4),
    ])
    vert = _summary([
        ("L1", "dice", "mean", 0.8, 0.7, 0.9, 3, 0),
        ("L2", "dice", "mean", 0.9, 0.8, 0.95, 2, 1),
        ("C1", "dice", "mean", float("nan"), float("nan"), float("nan"), 0, 4),
        ("all", "identification_rate", "mean", 0.5, 0.4, 0.6, 4, 0),
    ])
    table = results.compare_with_paper(paper, {"metastases": mets, "vertebrae": vert}).set_index(
        ["stage", "class", "metric"])
    assert table.loc[("metastases", "lytic", "Dice"), "paper"] == "0.71"
    assert table.loc[("metastases", "lytic", "Dice"), "ours"] == "0.65 (0.50–0.70)"
    assert table.loc[("metastases", "lytic", "Dice"), "n"] == "4"
    assert table.loc[("metastases", "lytic", "F2"), "ours"] == "0.60 (0.55–0.65)"
    assert table.loc[("metastases", "lytic", "PQ"), "ours"] == "–"
    assert table.loc[("metastases", "sclerotic", "Dice"), "ours"] == "–"
    assert table.loc[("vertebrae", "all vertebrae", "Dice"), "paper"] == "0.87–0.96"
    assert table.loc[("vertebrae", "all vertebrae", "Dice"), "ours"] == "0.80–0.90 (mean 0.85)"
    assert table.loc[("metastases", "sclerotic", "PQ"), "paper"] == "0.30"
    without_run = results.compare_with_paper(paper, {})
    assert (without_run["ours"] == "–").all() and len(without_run) == len(paper)


def test_provenance_statement_says_where_numbers_come_from():
    demo = {"profile": {"name": "demo", "file": "profiles/demo.yaml", "cohort": "synthetic"},
            "notebooks": [{"parameters": {"device": "cpu"}}], "status": "ok", "finished": "2026-01-01T00:00:00+00:00"}
    text = results.provenance_statement(demo)
    assert "**demo** profile" in text and "synthetic cohort on a CPU" in text and "not comparable" in text
    paper = {"profile": {"name": "paper", "cohort": "real"}, "notebooks": [{"parameters": {"device": "cuda"}}]}
    assert "public cohort" in results.provenance_statement(paper) and "CUDA" in results.provenance_statement(paper)
    assert "No pipeline run" in results.provenance_statement(None)
    assert "**status: book build failed**" in results.provenance_statement({**demo, "status": "book build failed"})
    assert "status" not in text, "a finished run does not repeat its status"


def test_run_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(runner.RUN_DIR_ENV, str(tmp_path))
    assert results.run_dir() == tmp_path
    monkeypatch.delenv(runner.RUN_DIR_ENV)
    assert results.run_dir(REPO) == REPO / "build" / "executed"


def test_run_summaries_and_per_case_come_from_the_run_workspace(tmp_path):
    """The page reads the tables where the workspace layout puts them (Workspace.evaluation)."""
    from spinemets.nnunet import Workspace

    (tmp_path / "_toc.yml").write_text("root: intro\n")  # tmp_path is the project root
    (tmp_path / "profiles").mkdir()
    ws = Workspace(tmp_path / "workspace" / "x")
    folder = ws.evaluation("metastases")
    folder.mkdir(parents=True)
    _summary([("lytic", "dice", "mean", 0.5, 0.4, 0.6, 2, 0)]).to_csv(folder / "summary.csv", index=False)
    pd.DataFrame([{"case": "a", "class": "lytic", "metric": "dice", "value": 0.5}]).to_csv(
        folder / "per_case.csv", index=False)
    provenance = {"notebooks": [{"parameters": {"workspace": "workspace/x"}}]}
    summaries = results.run_summaries(provenance, tmp_path)
    assert summaries["vertebrae"] is None and summaries["metastases"]["value"].tolist() == [0.5]
    assert results.run_per_case(provenance, "metastases", tmp_path)["case"].tolist() == ["a"]
    assert results.run_per_case(provenance, "vertebrae", tmp_path) is None
    assert results.run_summaries(None) == {"vertebrae": None, "metastases": None}


def test_training_statement_names_iterations_budget_and_cpu(tmp_path):
    import json

    from spinemets.nnunet import TRAINING_RECORD, Workspace

    (tmp_path / "_toc.yml").write_text("root: intro\n")
    (tmp_path / "profiles").mkdir()
    ws = Workspace(tmp_path / "workspace" / "x")
    provenance = {"notebooks": [{"parameters": {"workspace": "workspace/x"}}]}
    assert results.run_training(provenance, tmp_path) == []
    assert "no training record" in results.training_statement([])
    cpu = {"model": "Some CPU", "cores": 2, "torch_capability": "AVX2", "bf16_units": False, "threads": 2}
    for stage, iterations, budget in (("vertebrae", 123, 240.0), ("metastases", 6, None)):
        fold = ws.model_folder(stage, f"demo_{stage}", "T") / "fold_all"
        fold.mkdir(parents=True)
        (fold / TRAINING_RECORD).write_text(json.dumps(
            {"budget_s": budget, "iterations": iterations, "elapsed_s": 238.6, "seconds_per_iteration": 1.8,
             "bf16_autocast": False, "device": "cpu", "cpu": cpu}))
    rows = results.run_training(provenance, tmp_path)
    assert [(r["stage"], r["model"], r["fold"], r["iterations"]) for r in rows] == [
        ("vertebrae", "demo_vertebrae", "all", 123), ("metastases", "demo_metastases", "all", 6)]
    text = results.training_statement(rows)
    assert "vertebrae (demo_vertebrae, fold all): 123 iterations in 239 s of a 240 s budget, 1.80 s per iteration" in text
    assert "metastases (demo_metastases, fold all): 6 iterations in 239 s (a fixed iteration count)" in text
    assert "Some CPU, torch kernels AVX2, 2 threads, bfloat16 autocast off" in text


# --- per vertebra (the paper's Table 2), per lesion type, and the figure ------------------------

import math

import numpy as np
import pytest

from spinemets import labels


def _per_case(rows):
    return pd.DataFrame(rows, columns=["case", "class", "metric", "value"])


def _paper(rows):
    return pd.DataFrame(rows, columns=["stage", "configuration", "class", "metric", "value", "low", "high", "source"])


NAN = float("nan")
TWO_CASES = _per_case([
    ("a", "L1", "dice", 0.8), ("b", "L1", "dice", 0.9),
    ("a", "L1", "fbeta", 0.7), ("b", "L1", "fbeta", NAN),
    ("a", "L1", "pq", 0.5), ("b", "L1", "pq", 0.6),
    ("a", "L2", "dice", 0.6), ("b", "L2", "dice", NAN),
    ("a", "C1", "dice", NAN), ("b", "C1", "dice", NAN),
    ("a", "all", "dice", 0.1), ("a", "L1", "iou", 0.3),
])


def test_per_vertebra_table_is_the_mean_over_cases_per_vertebra():
    paper = _paper([
        ("vertebrae", "3d_fullres", "L1", "dice", 0.9, NAN, NAN, "x"),
        ("vertebrae", "3d_fullres", "L1", "pq", 0.4, NAN, NAN, "x"),
        ("vertebrae", "3d_fullres", "all vertebrae", "dice", NAN, 0.87, 0.96, "x"),
        ("metastases", "3d_cascade_fullres", "lytic", "dice", 0.71, NAN, NAN, "x"),
    ])
    table = results.per_vertebra_table(paper, TWO_CASES)
    assert list(table.index) == list(labels.VERTEBRAE) and len(table) == 25
    assert list(table.columns) == ["paper Dice", "paper F2", "paper PQ", "ours Dice", "ours F2", "ours PQ", "n"]
    assert table.loc["L1", "ours Dice"] == pytest.approx(0.85)
    assert table.loc["L1", "ours F2"] == pytest.approx(0.7)  # NaN of case b skipped
    assert table.loc["L1", "ours PQ"] == pytest.approx(0.55)
    assert table.loc["L1", "n"] == 2
    assert table.loc["L2", "ours Dice"] == pytest.approx(0.6) and table.loc["L2", "n"] == 1
    assert math.isnan(table.loc["C1", "ours Dice"]) and table.loc["C1", "n"] == 0  # absent: NaN, not 0
    assert math.isnan(table.loc["Sacrum", "ours Dice"]) and table.loc["Sacrum", "n"] == 0
    assert table.loc["L1", "paper Dice"] == pytest.approx(0.9) and table.loc["L1", "paper PQ"] == pytest.approx(0.4)
    assert math.isnan(table.loc["L1", "paper F2"]) and math.isnan(table.loc["T5", "paper Dice"])
    without_run = results.per_vertebra_table(paper, None)
    assert len(without_run) == 25 and without_run["ours Dice"].isna().all() and (without_run["n"] == 0).all()


def test_compare_with_paper_leaves_single_vertebrae_to_the_per_vertebra_table():
    paper = results.read_paper_results(REPO / "book" / "data" / "paper_results.csv")
    extra = _paper([("vertebrae", "3d_fullres", "L1", "dice", 0.9, NAN, NAN, "x")])
    both = pd.concat([paper, extra], ignore_index=True)
    ranges_and_lesions = paper[~paper["class"].isin(labels.VERTEBRAE)]
    assert len(results.compare_with_paper(both, {})) == len(ranges_and_lesions)
    assert results.paper_has_per_vertebra_values(both) and not results.paper_has_per_vertebra_values(
        ranges_and_lesions)


def test_per_lesion_type_table_sets_ours_beside_the_papers():
    paper = results.read_paper_results(REPO / "book" / "data" / "paper_results.csv")
    mets = _per_case([("a", "lytic", "dice", 0.5), ("b", "lytic", "dice", 0.7), ("a", "lytic", "pq", 0.2),
                      ("a", "sclerotic", "dice", NAN), ("b", "sclerotic", "dice", NAN)])
    table = results.per_lesion_type_table(paper, mets)
    assert list(table.index) == ["lytic", "sclerotic"]
    assert table.loc["lytic", "paper Dice"] == pytest.approx(0.71)
    assert table.loc["sclerotic", "paper PQ"] == pytest.approx(0.30)
    assert table.loc["lytic", "paper configuration"] == "3d_cascade_fullres"
    assert table.loc["lytic", "ours Dice"] == pytest.approx(0.6) and table.loc["lytic", "n"] == 2
    assert table.loc["lytic", "ours PQ"] == pytest.approx(0.2) and math.isnan(table.loc["lytic", "ours F2"])
    assert math.isnan(table.loc["sclerotic", "ours Dice"]) and table.loc["sclerotic", "n"] == 0


def test_paper_file_values_are_fractions_with_sources_and_vertebrae_come_complete():
    paper = results.read_paper_results(REPO / "book" / "data" / "paper_results.csv")
    values = pd.concat([paper["value"], paper["low"], paper["high"]]).dropna()
    assert ((values >= 0) & (values <= 1)).all()
    assert paper["source"].fillna("").str.contains("Edelmers et al. 2024").all()
    assert set(paper["metric"]) <= set(results.OUR_METRIC)
    single = paper[(paper["stage"] == "vertebrae") & paper["class"].isin(labels.VERTEBRAE)]
    for metric, rows in single.groupby("metric"):
        # a metric of the paper's Table 2 is entered for all 25 vertebrae or not at all
        assert sorted(rows["class"]) == sorted(labels.VERTEBRAE), metric
        assert rows["value"].notna().all(), metric


def test_read_paper_cohort(tmp_path):
    assert results.read_paper_cohort(tmp_path / "none.csv") is None
    (tmp_path / "bad.csv").write_text("characteristic,value\nsex,female\n")
    with pytest.raises(Exception, match="missing column"):
        results.read_paper_cohort(tmp_path / "bad.csv")


def test_per_vertebra_dice_figure_has_one_tick_per_vertebra():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spinemets import figures

    paper = _paper([("vertebrae", "3d_fullres", "L1", "dice", 0.9, NAN, NAN, "x")])
    table = results.per_vertebra_table(paper, TWO_CASES)
    fig = figures.per_vertebra_dice(table, TWO_CASES)
    ax = fig.axes[0]
    assert isinstance(fig, matplotlib.figure.Figure)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(labels.VERTEBRAE)
    assert len(ax.get_xticks()) == 25
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["ours, per case", "ours, mean over cases", "Edelmers et al. 2024"]
    points = [c.get_offsets().data.copy() for c in ax.collections]
    again = [c.get_offsets().data.copy() for c in figures.per_vertebra_dice(table, TWO_CASES).axes[0].collections]
    assert len(points) == len(again) == 4  # per-case points of L1 and L2, our means, the paper's
    assert all(np.array_equal(p, q) for p, q in zip(points, again))  # deterministic
    assert points[0].tolist() == [[18.75, 0.8], [19.25, 0.9]]  # L1's two cases, spread by rank
    assert np.allclose(points[2], [[labels.VERTEBRAE.index("L1"), 0.85], [labels.VERTEBRAE.index("L2"), 0.6]])
    assert points[3].tolist() == [[labels.VERTEBRAE.index("L1"), 0.9]]
    empty = figures.per_vertebra_dice(results.per_vertebra_table(_paper([]), None))
    assert len(empty.axes[0].get_xticks()) == 25 and empty.axes[0].get_legend() is None
    banded = figures.per_vertebra_dice(table, TWO_CASES, paper_range=(0.87, 0.96)).axes[0]
    (band,) = banded.patches  # the paper's range over vertebrae, across the axis
    ys = band.get_path().transformed(band.get_patch_transform()).vertices[:, 1]
    assert np.allclose([ys.min(), ys.max()], [0.87, 0.96])
    assert any("range over vertebrae (0.87–0.96)" in t.get_text() for t in banded.get_legend().get_texts())
    plt.close("all")


def test_published_froc_points_carry_their_citation_and_sit_beside_ours(tmp_path):
    import math

    import pytest

    from spinemets.errors import SpinemetsError

    published = results.read_published_froc(REPO / results.PUBLISHED_FROC)
    assert published["fp_per_case"].tolist() == [1.40, 0.617, 5.24]
    assert published["sensitivity"].tolist() == [0.891, 0.827, 0.894]
    bib = (REPO / "book" / "references.bib").read_text()
    for key, doi in zip(published["key"], published["doi"]):
        assert f"@article{{{key}," in bib and doi in bib
    # our "any" curve: thresholds 0.9, 0.6, 0.3 at 0.5, 1.0 and 6.0 FP per case, 10 lesions
    froc = pd.DataFrame({"class": ["any"] * 3 + ["lytic"], "threshold": [0.9, 0.6, 0.3, 0.9],
                         "sensitivity": [0.4, 0.7, 0.9, 1.0], "fp_per_case": [0.5, 1.0, 6.0, 0.0],
                         "tp": [4, 7, 9, 1], "fp": [2, 4, 24, 0], "n_reference": [10] * 3 + [1], "n_cases": [4] * 4})
    beside = results.froc_beside_published(froc, published).set_index("study")
    # 1.40 -> the 1.0 point (0.7); 0.617 -> the 0.5 point (0.4); 5.24 -> still the 1.0 point (6.0 is above it)
    assert beside["ours"].tolist() == [0.7, 0.4, 0.7]
    assert beside["our threshold"].tolist() == [0.6, 0.9, 0.6]
    assert all(math.isnan(v) for v in results.froc_beside_published(None, published)["ours"])
    assert results.run_detection(None) is None
    bad = tmp_path / "published.csv"
    published.assign(sensitivity=[89.1, 0.827, 0.894]).to_csv(bad, index=False)
    with pytest.raises(SpinemetsError, match="fraction"):
        results.read_published_froc(bad)
