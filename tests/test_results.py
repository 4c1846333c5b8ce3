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
