"""benchmarks/: their data, their protocol (validation chooses, test reports), their log and tables."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from benchmarks import federated, results, robustness
from benchmarks.federated import Job, RunLog, Sizes
from tests.helpers.markdown import row_of, table_rows


def test_rt3_csv_has_three_labels_without_duplicates(tmp_path: Path) -> None:
    path = federated.rt3_csv(tmp_path)
    with path.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    labels = {r["label"] for r in rows}
    assert labels == {"fresh", "rotten", "plot"}
    texts = [r["text"] for r in rows]
    assert len(texts) == len(set(texts)) > 12000  # 12.7k fresh/rotten + ~1.1k plot, deduplicated
    assert federated.rt3_csv(tmp_path) == path  # built once


def _fake(val: float, test: float, n: int = 2, metric: str = "accuracy") -> dict:
    return {
        "metric": metric,
        "validation": [val] * n,
        "test": [test] * n,
        "test_global": [test - 0.1] * n,
        "rank": [8.0] * n,
        "entropy_rank": [5.0] * n,
        "private_energy": [0.3] * n,
        "examples_per_round": 80.0,
        "flops_per_round": 1e9,
        "client_majority": [0.6] * n,
        "global_majority": [0.5] * n,
        "seconds": 1.0,
    }


@pytest.mark.parametrize(("jitter", "within_noise"), [(0.001, []), (0.01, ["within_1_of_homlora"])])
def test_setting_line_chooses_on_validation_and_reports_test(tmp_path: Path, jitter: float, within_noise: list) -> None:
    # PF2LoRA: default, x1/3, x3; HOMLoRA: tuned, x1/2, x2 (robustness.grids); two seeds each
    scores = {
        ("pf2lora", 0): (0.70, 0.60),
        ("pf2lora", 1): (0.80, 0.55),  # best on validation, worse on test: still the tuned one
        ("pf2lora", 2): (0.60, 0.90),  # best on test: never chosen
        ("homlora", 0): (0.50, 0.50),
        ("homlora", 1): (0.65, 0.62),
        ("homlora", 2): (0.40, 0.99),
    }
    grid = robustness.grids("rt2_s0.5")
    log = RunLog(tmp_path / "runs.jsonl", Sizes())
    for arm, configs in grid.items():
        for i, o in enumerate(configs):
            val, test = scores[(arm, i)]
            for seed, sign in ((0, -1), (1, 1)):
                log.add(Job("rt2_s0.5", tuple(o), seed), _fake(val + sign * jitter, test + sign * jitter))
    line = robustness.setting_line("rt2_s0.5", RunLog(log.path, Sizes()), [0, 1])  # read back from disk
    assert line["pf2lora_tuned"]["config"] == " ".join(grid["pf2lora"][1])
    assert line["homlora_tuned"]["config"] == " ".join(grid["homlora"][1])
    assert line["gap_to_tuned"] == pytest.approx(-5.0)  # 55 - 60 points
    assert line["gap_to_homlora"] == pytest.approx(2.0)  # 62 - 60: more than 1 point below HOMLoRA
    assert line["targets"] == {"within_2_of_tuned": True, "within_1_of_homlora": False}
    assert line["meets_targets"] is False
    # the 1-point shortfall against the standard error of the difference: sqrt(2) x 0.1 or 1 point
    assert line["missed_within_noise"] == within_noise
    json.dumps(line)  # one JSON line
    table = robustness.summary_rows([line, {"setting": "rt3_s0.9", "missing": ["x"]}])
    assert "missed" in table[2] and "not run" in table[3]


def test_setting_line_says_what_is_missing(tmp_path: Path) -> None:
    line = robustness.setting_line("rt3_s0.9", RunLog(tmp_path / "none.jsonl", Sizes()), [0])
    assert line["setting"] == "rt3_s0.9" and len(line["missing"]) == 6


def test_perplexity_gaps_are_relative(tmp_path: Path) -> None:
    grid = robustness.grids(federated.REVIEWS)
    log = RunLog(tmp_path / "runs.jsonl", Sizes())
    ppl = {("pf2lora", 0): 50.0, ("pf2lora", 1): 49.0, ("pf2lora", 2): 55.0, ("homlora", 0): 49.5}
    for arm, configs in grid.items():
        for i, o in enumerate(configs):
            value = ppl.get((arm, i), 80.0)
            log.add(Job(federated.REVIEWS, tuple(o), 0), _fake(value, value, metric="perplexity"))
    line = robustness.setting_line(federated.REVIEWS, log, [0])
    assert line["unit"] == "% of tuned"
    assert line["gap_to_tuned"] == pytest.approx(100 * 1.0 / 49.0)  # 2.04% worse than its optimum
    assert line["targets"]["within_2_of_tuned"] is False
    assert math.isnan(line["gap_to_tuned_se"]) and line["missed_within_noise"] == []  # one seed: no error bar


def test_synthetic_score_is_the_excess_loss_share_left() -> None:
    # scale-free: -||M - dW||^2 / ||dW||^2 per client, 0 = the true update, -1 = nothing learned
    res = robustness.synthetic_result(["algorithm=homlora", "algorithm.lr=0.03"], large=False, seed=0)
    assert res["metric"] == "neg_excess_loss_share" and len(res["test"]) == len(res["true_rank"]) == 4
    assert res["test"] == res["validation"] and all(-1.0 < s < 0.0 for s in res["test"])
    assert all(loss > 0 for loss in res["expected_loss"])


def test_log_reuses_finished_runs_skips_torn_lines_and_other_sizes(tmp_path: Path) -> None:
    path = tmp_path / "runs.jsonl"
    job = Job("rt2_s0.5", ("algorithm=homlora",), 0)
    RunLog(path, Sizes()).add(job, _fake(0.5, 0.5))
    RunLog(path, Sizes(rounds=9)).add(job, _fake(0.9, 0.9))  # another size: another run
    with path.open("a") as f:
        f.write('{"key": "torn')  # a writer killed mid-line
    again = RunLog(path, Sizes())
    assert again.result(job) is not None and again.result(job)["test"] == [0.5, 0.5]
    assert RunLog(path, Sizes(rounds=9)).result(job)["test"] == [0.9, 0.9]
    ran = federated.run_all([job], again, workers=1)
    assert ran == []  # nothing to run, nothing failed


def test_unknown_setting_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="unknown setting"):
        federated.setting_overrides("rt4_s0.5", tmp_path)
    with pytest.raises(SystemExit):
        robustness.main(["--settings", "rt2_s0.4"])


def test_results_tables_give_each_algorithm_its_own_runs(tmp_path: Path) -> None:
    """Every row of a setting's table reads its own algorithm's runs (not the first algorithm's)."""
    tuned = {"pf2lora": ["algorithm.lr=0.002"], "homlora": ["algorithm.lr=0.004"]}
    log = RunLog(tmp_path / "runs.jsonl", Sizes())
    for i, name in enumerate(results.ALGORITHMS):
        for seed in (0, 1):
            log.add(
                Job("rt2_s0.5", results.algorithm_overrides(name, tuned), seed), _fake(0.5, 0.5 + i / 100 + seed / 500)
            )
    readme = results.render(log, tuned, [0, 1], tmp_path)
    text = readme.read_text()
    section = text.split("## Rotten Tomatoes 2-way, s = 0.5")[1].split("##")[0]
    rows = {row[0]: row for row in table_rows(section)}  # algorithm, configuration, personalized test, ...
    for i, name in enumerate(results.ALGORITHMS):
        assert rows[name][2].startswith(f"{0.5 + i / 100 + 0.001:.3f} ± "), name
    assert rows["local"][2].endswith(" *") and "*" not in "".join(rows["centralized"])  # a reference, never best
    assert "`lr=0.004`" in rows["homlora"][1] and "not tuned" in rows["local"][1]
    assert "prior: client majority" in section and "0.600" in section
    assert (tmp_path / "plots" / "rt2_accuracy_vs_s.png").exists()
    # the prose between the markers survives a re-render
    readme.write_text(text.replace("(No prose yet.)", "Our reading."))
    assert "Our reading." in results.render(log, tuned, [0, 1], tmp_path).read_text()


def test_results_mark_the_lowest_perplexity_best(tmp_path: Path) -> None:
    """Perplexity: lower is better, so the smallest mean gets the *, in the setting and the summary table."""
    log = RunLog(tmp_path / "runs.jsonl", Sizes())
    rows = results.algorithm_rows({})
    for i, (_, overrides) in enumerate(rows.values()):  # pf2lora (first) lowest, then 1 apart: all told apart
        for seed in (0, 1):
            log.add(Job("rt2_s0.5", overrides, seed), _fake(10.0, 10.0 + i + seed / 100, metric="perplexity"))
    table = {row[0]: row for row in table_rows("\n".join(results.setting_table(log, "rt2_s0.5", rows, [0, 1])))}
    column = results.settings().index("rt2_s0.5") + 1
    summary = {row[0]: row for row in table_rows("\n".join(results.summary_table(log, {}, [0, 1])))}
    for cells in (table[results.PF2LORA][2], summary[results.PF2LORA][column]):
        assert cells.endswith(" *")
    for name in results.ALGORITHMS[1:]:
        assert not table[name][2].endswith(("*", "≈")) and not summary[name][column].endswith(("*", "≈")), name


def test_prior_rows_read_every_seed_any_row_has(tmp_path: Path) -> None:
    # the first row ran seed 0 only, another seed 1 only: the prior covers both seeds' splits
    log = RunLog(tmp_path / "runs.jsonl", Sizes())
    first, other = (results.algorithm_overrides(a, {}) for a in ("pf2lora", "homlora"))
    log.add(Job("rt2_s0.5", first, 0), {**_fake(0.5, 0.5), "client_majority": [0.6, 0.6]})
    log.add(Job("rt2_s0.5", other, 1), {**_fake(0.5, 0.5), "client_majority": [0.8, 0.8]})
    rows = {"pf2lora": ("", first), "homlora": ("", other)}
    runs = results.prior_runs(log, "rt2_s0.5", rows, [0, 1])
    assert [r["client_majority"][0] for r in runs] == [0.6, 0.8]


def test_results_jobs_cover_every_algorithm_and_ablation() -> None:
    tuned = {results.PF2LORA: ["algorithm.lr=0.002"]}
    jobs = results.jobs_of("rt3_s0.9", tuned, [0, 1, 2])
    assert {j.overrides[0] for j in jobs} == {f"algorithm={a}" for a in results.ALGORITHMS}
    assert len(jobs) == 3 * len(results.ALGORITHMS)
    ablations = results.jobs_of("ablations", tuned, [0])
    assert len(ablations) == len(results.ABLATIONS) * len(results.ABLATION_SETTINGS)
    assert all(j.overrides[:2] == (f"algorithm={results.PF2LORA}", "algorithm.lr=0.002") for j in ablations)
    with pytest.raises(SystemExit, match="unknown stage"):
        results.jobs_of("rt5_s0.5", tuned, [0])


def test_robustness_table_goes_between_the_readme_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# Prose\n\nkept\n\n{robustness.TABLE_START}\nold\n{robustness.TABLE_END}\n\nafter\n")
    robustness.write_table(readme, [{"setting": "rt2_s0.3", "missing": ["x"]}])
    text = readme.read_text()
    assert "kept" in text and "after" in text and "old" not in text
    assert row_of(text, "rt2_s0.3")[:3] == ["rt2_s0.3", "", "not run"]


def test_grid_grows_past_an_edge_optimum(tmp_path: Path) -> None:
    log = RunLog(tmp_path / "runs.jsonl", Sizes())
    base = robustness.grids("rt2_s0.5")
    assert len(base["homlora"]) == len(base["pf2lora"]) == 3
    lr = float(base["homlora"][0][1].partition("=")[2])

    def add(arm: str, overrides: list[str]) -> None:
        value = float(overrides[-1].partition("=")[2]) if len(overrides) > 1 else 0.002
        for seed in (0, 1):  # HOMLoRA: validation rises with lr (edge x2); PF2LoRA: peak inside
            score = value / lr if arm == "homlora" else 1.0 - abs(value - 0.002)
            log.add(Job("rt2_s0.5", tuple(overrides), seed), _fake(score, score))

    for arm, configs in base.items():
        for o in configs:
            add(arm, o)
    grown = robustness.grids("rt2_s0.5", log, [0, 1])
    assert grown["pf2lora"] == base["pf2lora"]  # its optimum is inside: nothing added
    assert grown["homlora"][:3] == base["homlora"] and grown["homlora"][3] == [
        "algorithm=homlora",
        f"algorithm.lr={lr * 4:g}",
    ]
    assert len(robustness.grids("rt2_s0.5", log, [0, 1, 2])["homlora"]) == 3  # seed 2 not run: no edge yet
    add("homlora", grown["homlora"][3])
    again = robustness.grids("rt2_s0.5", log, [0, 1])
    assert again["homlora"][4] == ["algorithm=homlora", f"algorithm.lr={lr * 8:g}"]
    assert len(robustness.grids("rt2_s0.5", log, [0, 1], max_extra=1)["homlora"]) == 4
    line = robustness.setting_line("rt2_s0.5", log, [0, 1])
    assert line["homlora_tuned"]["config"] == f"algorithm=homlora algorithm.lr={lr * 4:g}"  # x8 not run yet


def test_a_logged_run_is_reused_only_at_the_configuration_it_ran(tmp_path: Path) -> None:
    # A row records the digest of its resolved algorithm section; when a default changes (as
    # PF2LoRA's did in issue 29) the same overrides resolve differently and the row is not reused.
    job = Job("rt2_s0.5", ("algorithm=pf2lora",), 0)
    log = RunLog(tmp_path / "runs.jsonl", Sizes())
    log.add(job, _fake(0.5, 0.5))
    assert RunLog(log.path, Sizes()).result(job) is not None  # read back: same configuration
    rows = [json.loads(line) for line in log.path.read_text().splitlines()]
    rows[0][federated.DIGEST] = federated.algorithm_digest(("algorithm=pf2lora_exact",))  # ran the old default
    log.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stale = RunLog(log.path, Sizes())
    assert stale.result(job) is None and job.key in stale.done  # kept on file, never reused
    del rows[0][federated.DIGEST]  # a row from before digests were kept: never reused either
    log.path.write_text(json.dumps(rows[0]) + "\n")
    assert RunLog(log.path, Sizes()).result(job) is None
    # interpolations are resolved: an explicit value equal to the default is the same configuration
    lr = float(robustness.algorithm_defaults("pf2lora_exact")["lr"])
    same = ("algorithm=pf2lora_exact", f"algorithm.inner_lr={lr}")
    assert federated.algorithm_digest(same) == federated.algorithm_digest(("algorithm=pf2lora_exact",))
    assert federated.algorithm_digest(("algorithm=pf2lora",)) != federated.algorithm_digest(same)
