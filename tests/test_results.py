"""spinemets.report.results: the results page's run, its provenance statement, and our numbers beside the paper's."""

from __future__ import annotations

import pandas as pd

from conftest import REPO
from spinemets import labels
from spinemets.report import results
from spinemets.run import runner


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
    assert (without_run["ours"] == "–").all()
    assert len(without_run) == len(paper[~paper["class"].isin(labels.VERTEBRAE)]) == 7  # single vertebrae: Table 2


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
    from spinemets.paths import Workspace

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

    from spinemets.training.nnunet import TRAINING_RECORD
    from spinemets.paths import Workspace

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
    assert ("vertebrae (demo_vertebrae, fold all): 123 iterations, this run used a time budget of 240 s, 239 s, "
            "1.80 s per iteration") in text
    assert "metastases (demo_metastases, fold all): 6 iterations (a fixed iteration count), 239 s" in text
    assert "Some CPU, torch kernels AVX2, 2 threads, bfloat16 autocast off" in text
    assert "This run used a time budget (`--train-budget`)" in text and "for this machine only" in text
    # fixed iterations with the demo's seed (no budget): the page says the numbers hold on any CPU
    fixed = [{**r, "budget_s": None, "seed": 0} for r in rows]
    text = results.training_statement(fixed)
    assert "vertebrae (demo_vertebrae, fold all): 123 iterations (a fixed iteration count), seed 0, 239 s" in text
    assert "the numbers are the same on any CPU" in text and "time budget" not in text
    assert "without a seed" in results.training_statement([{**r, "budget_s": None} for r in rows])


# --- per vertebra (the paper's Table 2), per lesion type, and the figure ------------------------

import math

import numpy as np
import pytest

from spinemets import labels
from spinemets.errors import SpinemetsError


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


PAPER_DIR = REPO / "book" / "data" / "paper"


def test_the_papers_tables_come_into_the_paper_values_as_printed():
    """Table 2 (25 vertebrae) and Table 3 (2 lesion types) as transcribed, each value with its table's source."""
    paper = results.read_paper_results(REPO / "book" / "data" / "paper_results.csv")
    table2 = pd.read_csv(PAPER_DIR / "table2_vertebrae.csv")
    vertebrae = paper[(paper["stage"] == "vertebrae") & paper["class"].isin(labels.VERTEBRAE)]
    assert len(vertebrae) == 75 and set(vertebrae["configuration"]) == {"3d_fullres"}
    assert vertebrae["source"].str.contains("Edelmers et al. 2024, Table 2").all()
    for column, metric in (("dice", "dice"), ("fbeta", "f2"), ("pq", "pq")):
        values = vertebrae[vertebrae["metric"] == metric].set_index("class")["value"]
        assert values.to_dict() == table2.set_index("vertebra")[column].to_dict(), metric
    dice = vertebrae[vertebrae["metric"] == "dice"].set_index("class")["value"]
    assert dice["T7"] == 0.87 and dice["Sacrum"] == 0.96 and dice["C2"] == 0.95
    # the range over vertebrae the paper's text states is the range of its Table 2
    text = paper[paper["class"] == "all vertebrae"].iloc[0]
    assert (text["low"], text["high"]) == (dice.min(), dice.max())
    lesions = paper[paper["stage"] == "metastases"].set_index(["class", "metric"])["value"]
    assert lesions[("sclerotic", "f2")] == 0.57 and lesions[("lytic", "pq")] == 0.45
    assert results.paper_has_per_vertebra_values(paper)
    table = results.per_vertebra_table(paper, None)
    assert table["paper Dice"].notna().all() and table.loc["T6", "paper F2"] == 0.87
    assert table.loc["L4", "paper F2"] == 0.89 and table.loc["L4", "paper PQ"] == 0.84


def test_a_paper_table_must_hold_every_class_once_with_fractions(tmp_path):
    table2 = pd.read_csv(PAPER_DIR / "table2_vertebrae.csv")
    table3 = pd.read_csv(PAPER_DIR / "table3_metastases.csv")
    table3.to_csv(tmp_path / "table3_metastases.csv", index=False)
    for broken, message in ((table2.drop(index=6), "expected each of"),
                            (table2.assign(pq=table2["pq"].where(table2["vertebra"] != "L1", 83.0)), "between 0 and 1"),
                            (table2.rename(columns={"fbeta": "f2"}), "columns")):
        broken.to_csv(tmp_path / "table2_vertebrae.csv", index=False)
        with pytest.raises(SpinemetsError, match=message):
            results.read_paper_results(REPO / "book" / "data" / "paper_results.csv", tables=tmp_path)
    with pytest.raises(SpinemetsError, match="Table 2 not found"):
        results.read_paper_table(2, tmp_path / "none")


def test_with_intervals_shows_our_mean_with_its_bootstrap_interval():
    paper = results.read_paper_results(REPO / "book" / "data" / "paper_results.csv")
    table = results.per_vertebra_table(paper, TWO_CASES)
    summary = _summary([("L1", "dice", "mean", 0.85, 0.8, 0.9, 2, 0), ("L1", "dice", "pooled", 0.1, 0.0, 0.2, 2, 0),
                        ("L1", "pq", "mean", 0.55, NAN, NAN, 2, 0)])
    shown = results.with_intervals(table, summary)
    assert list(shown.columns) == ["paper Dice", "paper F2", "paper PQ", "ours Dice (95 % CI)", "ours F2 (95 % CI)",
                                   "ours PQ (95 % CI)", "n"]
    assert shown.loc["L1"].tolist() == ["0.95", "0.94", "0.83", "0.85 (0.80–0.90)", "0.70", "0.55", 2]
    assert shown.loc["C1"].tolist() == ["0.94", "0.94", "0.75", "–", "–", "–", 0]
    assert shown.loc["L2", "ours Dice (95 % CI)"] == "0.60"  # no interval in the summary: the mean alone
    per_type = results.with_intervals(results.per_lesion_type_table(paper, None), None)
    assert per_type.loc["lytic", "paper configuration"] == "3d_cascade_fullres"
    assert per_type.loc["sclerotic"].tolist()[1:4] == ["0.61", "0.57", "0.30"]


def test_cohort_beside_paper_summarises_table_1_and_the_runs_cohort():
    paper = results.read_paper_cohort(PAPER_DIR / "table1_cohort.csv")
    assert len(paper) == 38 and list(paper.columns) == ["sex", "age", "metastasis_type", "primary_site"]
    cohort = pd.DataFrame({"case_id": ["a", "b", "c", "d"], "sex": ["F", "M", "F", "F"], "age": [50, 60, 70, 80],
                           "metastasis_type": ["lytic", "mixed", "lytic", "none"],
                           "primary_site": ["breast", "lung", "prostate", "breast"]})
    real = results.cohort_beside_paper(paper, cohort, synthetic=False)
    assert real.loc[("cases", ""), "paper"] == "38" and real.loc[("cases", ""), "this run"] == "4"
    assert real.loc[("type of metastasis", "Lytic")].tolist() == ["19 (50 %)", "2 (50 %)"]
    assert real.loc[("type of metastasis", "Sclerotic")].tolist() == ["19 (50 %)", "–"]
    assert real.loc[("type of metastasis", "mixed")].tolist() == ["–", "1 (25 %)"]
    assert real.loc[("sex", "Female"), "this run"] == "3 (75 %)"  # F read as female
    assert real.loc[("primary site", "Breast")].tolist() == ["15 (39 %)", "2 (50 %)"]
    assert real.loc[("primary site", "Blader"), "paper"] == "1 (3 %)"  # the paper's spelling
    assert real.loc[("age (years)", "mean ± SD (range)"), "this run"] == "65.0 ± 12.9 (50–80)"
    synthetic = results.cohort_beside_paper(paper, cohort, synthetic=True)
    assert synthetic.loc[("type of metastasis", "Lytic"), "this run"] == "2 (50 %)"
    shown = synthetic.drop(index=["cases", "type of metastasis"], level=0)["this run"]
    assert (shown == "–").all(), "a synthetic cohort's drawn sex, age and site are not set beside the paper's"
    alone = results.cohort_beside_paper(paper, None, synthetic=False)
    assert (alone["this run"] == "–").all() and alone["paper"].ne("–").all()


def test_run_cohort_is_the_cohort_csv_of_the_runs_lesion_cases(tmp_path):
    (tmp_path / "_toc.yml").write_text("root: intro\n")  # tmp_path is the project root
    (tmp_path / "profiles").mkdir()
    for folder in ("data/both", "data/lesions"):
        (tmp_path / folder).mkdir(parents=True)
        pd.DataFrame({"case_id": [folder], "sex": ["F"], "age": [1]}).to_csv(tmp_path / folder / "cohort.csv",
                                                                          index=False)
    one = {"notebooks": [{"parameters": {"data_dir": "data/both"}}]}
    cohort, path = results.run_cohort(one, tmp_path)
    assert cohort["case_id"].tolist() == ["data/both"] and path == tmp_path / "data/both/cohort.csv"
    staged = {"notebooks": [{"parameters": {"data_dir": "data/both",
                                            "stage_data": {"vertebrae": "data/v", "metastases": "data/lesions"}}}]}
    assert results.run_cohort(staged, tmp_path)[0]["case_id"].tolist() == ["data/lesions"]
    none = {"notebooks": [{"parameters": {"data_dir": "data/missing"}}]}
    assert results.run_cohort(none, tmp_path) == (None, tmp_path / "data/missing/cohort.csv")
    assert results.run_cohort(None, tmp_path) == (None, None)


def test_per_vertebra_dice_figure_has_one_tick_per_vertebra():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spinemets.report import figures

    paper = _paper([("vertebrae", "3d_fullres", "L1", "dice", 0.9, NAN, NAN, "x")])
    table = results.per_vertebra_table(paper, TWO_CASES)
    fig = figures.per_vertebra_dice(table, TWO_CASES)
    ax = fig.axes[0]
    assert isinstance(fig, matplotlib.figure.Figure)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(labels.VERTEBRAE)
    assert len(ax.get_xticks()) == 25
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["ours, per case", "ours, mean over cases", "Edelmers et al. 2024 (Table 2)"]
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


def test_stage1_statement_names_the_trained_model_or_totalsegmentator(tmp_path):
    import json

    from spinemets.paths import Workspace

    (tmp_path / "_toc.yml").write_text("root: intro\n")
    (tmp_path / "profiles").mkdir()
    ws = Workspace(tmp_path / "workspace" / "x")
    provenance = {"notebooks": [{"parameters": {"workspace": "workspace/x"}}]}
    assert results.stage1_statement(provenance, tmp_path) == ""  # no predictions yet
    assert results.stage1_statement(None, tmp_path) == ""
    ws.predictions.mkdir(parents=True)
    record = {"parameters": {"vertebrae": "trained"},
              "models": {"vertebrae": [{"folder": "/x/y", "configuration": "demo_vertebrae",
                                        "trainer": "SpinemetsVertebraeDemoTrainer", "folds": ["all"]}]}}
    (ws.predictions / "provenance.json").write_text(json.dumps(record))
    text = results.stage1_statement(provenance, tmp_path)
    assert text == ("**Stage 1 (vertebrae):** this run's trained nnU-Net model: demo_vertebrae "
                    "(SpinemetsVertebraeDemoTrainer, fold all).")
    record = {"parameters": {"vertebrae": "totalsegmentator"},
              "models": {"vertebrae": [{"model": "TotalSegmentator 2.18.0", "task": "total", "mode": "fast (3 mm)",
                                        "roi_subset": "C1-L5, S1 and sacrum", "weights": "/home/u/.totalsegmentator"}]}}
    (ws.predictions / "provenance.json").write_text(json.dumps(record))
    text = results.stage1_statement(provenance, tmp_path)
    assert text.startswith("**Stage 1 (vertebrae):** TotalSegmentator 2.18.0, task `total`, fast (3 mm) model")
    assert "not trained in this run" in text and "/home/u" not in text
