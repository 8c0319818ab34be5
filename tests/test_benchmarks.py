"""The benchmark scripts run end to end in --quick mode and write their JSON and PNG (no timing asserted);
the soak names the pair it serves."""

import importlib.util
import json
import runpy
import signal
import sys
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
import torch

from helix_serve.config import DEFAULT_DRAFT, DEFAULT_TARGET, TOY_DRAFT, TOY_TARGET
from helix_serve.model.int4 import DENSE_PROBE_WIDTHS

ROOT = Path(__file__).resolve().parents[1]


TIME_LIMIT_S = 300  # a quick run takes seconds; a hung one fails its test instead of the whole suite


@pytest.fixture(autouse=True)
def scripts_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # the scripts import bench_common from their folder
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # each script sets its own
    if plt := sys.modules.get("matplotlib.pyplot"):
        plt.close("all")


def _too_long(signum, frame):
    raise TimeoutError(f"the benchmark ran past {TIME_LIMIT_S} s")


def _run(script: str, out: Path, *args: str) -> dict:
    """The script as `python scripts/SCRIPT --quick --out OUT ARGS` would run it, in this process: a new
    interpreter would import torch and transformers again (~5 s a script). Its seeds stay its own."""
    argv = [str(ROOT / "scripts" / script), "--quick", "--out", str(out), *args]
    previous = signal.signal(signal.SIGALRM, _too_long)
    signal.alarm(TIME_LIMIT_S)
    try:
        with patch.object(sys, "argv", argv), torch.random.fork_rng():
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exit_:
        assert exit_.code in (None, 0), f"{script} exited with {exit_.code}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    name = script.removesuffix(".py")
    assert (out / f"{name}.png").stat().st_size > 0
    return json.loads((out / f"{name}.json").read_text())


def test_sweep_benchmark_quick(llama_pair, tmp_path):
    target, draft = llama_pair
    result = _run("bench_sweep.py", tmp_path, "--target", str(target), "--draft", str(draft), "--dtype", "float32")
    limit = result["bandwidth_limit"]["limit_step_s"]
    assert result["rows"] and limit > 0
    for row in result["rows"]:
        assert row["bandwidth_limit_ratio"] == pytest.approx(limit * 1e3 / row["step_ms"])


def test_speculative_benchmark_reports_the_bandwidth_limit(llama_pair, tmp_path):
    target, draft = llama_pair
    result = _run("bench_speculative.py", tmp_path, "--target", str(target), "--draft", str(draft), "--dtype", "float32")
    cost = result["cost"]
    assert cost["gemv_bytes_per_s"] > 1e8 and cost["weight_bytes"] > 0
    assert cost["limit_step_s"] == pytest.approx(cost["weight_bytes"] / cost["gemv_bytes_per_s"])
    # int4 rows are measured against the bytes their 4-bit projections read: fewer than fp32's
    assert cost["int4"]["weight_bytes"] < cost["weight_bytes"]
    for name, row in result["rows"].items():
        limit = cost["int4"] if "int4" in name else cost
        assert row["bandwidth_limit_ratio"] == pytest.approx(limit["limit_step_s"] * 1e3 / row["step_ms"])
    assert {"helix int4 K=0", "helix int4 adaptive K"} <= result["rows"].keys()


def test_scale_benchmark_quick_reports_controlled_alpha(tmp_path):
    result = _run("bench_scale.py", tmp_path, "--dtype", "float32", "--alphas", "0.9")
    assert result["alpha"] == "controlled"
    [row] = result["rows"]
    assert row["identical_to_plain_greedy"]  # fp32: speculative greedy equals the target alone
    assert row["alpha_observed"] > 0.6
    cost = result["cost"]
    assert cost["limit_step_s"] == pytest.approx(cost["weight_bytes"] / cost["gemv_bytes_per_s"])
    assert 0 < row["plain_bandwidth_limit_ratio"] and 0 < row["spec_bandwidth_limit_ratio"]


def test_gpu_benchmark_quick_runs_every_shape_on_the_cpu(tmp_path):
    """bench_gpu.py's logic, on the CPU (the GPU run is docs/BENCHMARKS.md §14): each shape's K=0, controlled-α
    speculation equal to K=0 in fp32, transformers beside it, and the limit from the device's own bandwidth."""
    result = _run("bench_gpu.py", tmp_path, "--device", "cpu", "--dtype", "float32")
    assert result["device"] == "CPU" and [r["target"] for r in result["rows"]] == ["tinyllama-1.1b", "llama-8b"]
    for row in result["rows"]:
        assert row["spec_identical"] and row["spec_alpha_seen"] > 0.5
        assert row["limit_step_s"] == pytest.approx(row["weight_bytes"] / row["gemv_bytes_per_s"])
        assert row["k0_over_limit"] > 0 and row["hf_tokens_per_s"] > 0 and row["batch_over_hf"] > 0


def test_prefix_benchmark_quick_is_lossless_and_leaves_no_block_in_use(llama_pair, tmp_path):
    target, draft = llama_pair
    result = _run("bench_prefix.py", tmp_path, "--target", str(target), "--draft", str(draft), "--dtype", "float32")
    assert result["chat"]["identical"] and result["blocks_in_use_after"] == {"on": 0, "off": 0}
    assert result["chat"]["on_cached_fraction"] > 0 and result["ttft"]["warm_ttft_ms"] > 0


def test_linear_benchmark_times_both_projection_paths(llama_pair, tmp_path):
    target, _ = llama_pair
    result = _run("bench_linear.py", tmp_path, "--target", str(target), "--dtype", "float32")
    assert [row["batch"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert {"F.linear q1", "F.linear q5", "weight-major q1", "weight-major q5"} <= row.keys()
        assert all(row[key] > 0 for key in row if key != "batch")


def test_row_padding_benchmark_times_each_pass_both_ways(llama_pair, tmp_path):
    target, _ = llama_pair
    result = _run("bench_row_padding.py", tmp_path, "--target", str(target), "--dtype", "float32")
    sequence = [row for row in result["rows"] if row["layout"] == "sequence"]
    verify = [row for row in result["rows"] if row["layout"] == "verify"]
    assert [row["tokens"] for row in sequence] == list(range(1, 21)) and [row["rows"] for row in verify] == [1, 2, 3, 4]
    assert all(row["as they come"] > 0 and row["padded"] > 0 and row["width"] >= row["tokens"]
               for row in result["rows"])
    assert result["widths"][:21] == [0] + [row["width"] for row in sequence]


def test_int4_rows_benchmark_times_the_kernel_and_the_copies(llama_pair, tmp_path):
    target, _ = llama_pair
    result = _run("bench_int4_rows.py", tmp_path, "--target", str(target))
    assert [row["rows"] for row in result["rows"]] == [1, 4, 16]
    assert all(row["kernel_ms"] > 0 and row["copy_ms"] > 0 for row in result["rows"])
    assert result["auto"] in (0, *DENSE_PROBE_WIDTHS)


def test_planner_benchmark_quick_reports_every_method_and_goal(llama_pair, tmp_path):
    target, draft = llama_pair
    result = _run("bench_planner.py", tmp_path, "--target", str(target), "--draft", str(draft), "--dtype", "float32")
    methods = set(result["batch_1"]["mixed"])
    assert {"K=0", "draft planned", "ngram planned", "hybrid planned", "HF prompt lookup"} <= methods
    assert all(row["tokens"] > 0 for row in result["batch_1"]["mixed"].values())
    assert result["prompt_lookup_cost"]["ms_per_step"] > 0 and len(result["goals"]) > 10


def test_soak_serves_the_toy_pair_unless_asked_for_the_real_one(tmp_path):
    spec = importlib.util.spec_from_file_location("soak", ROOT / "scripts" / "soak.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    assert soak.model_args(tmp_path, real_pair=False) == {"target_model": TOY_TARGET, "draft_model": TOY_DRAFT}
    assert soak.model_args(tmp_path, real_pair=True) == {"target_model": DEFAULT_TARGET, "draft_model": DEFAULT_DRAFT}


@pytest.mark.parametrize("arrival", ["streams", "wave"])
def test_load_benchmark_quick_reports_each_method_against_k0_and_the_cost_error(llama_pair, eagle_dir, tmp_path,
                                                                               arrival):
    target, draft = llama_pair
    result = _run("bench_load.py", tmp_path, "--target", str(target), "--draft", str(draft), "--dtype", "float32",
                  "--eagle-head", str(eagle_dir), "--quantizations", "none", "--arrival", arrival)
    table = result["results"]["none"]
    assert list(table) == ["1", "4"]  # JSON keys: the quick run's stream counts
    for streams, rows in table.items():
        assert set(rows) == {"K=0", "draft", "ngram", "hybrid", "K=0 (head)", "eagle", "hybrid+eagle"}
        assert all(r["steps"] > 0 and r["cost_error_median"] >= 0 for r in rows.values())
        # 12 tokens per request, EOS ignored: a wave decodes exactly that; streams (6-18 tokens a request, 12 on
        # average) stop once they have, or one step (at most 9 tokens a stream) past it
        budget = int(streams) * 12
        assert all(r["tokens"] == budget if arrival == "wave" else budget <= r["tokens"] < budget + int(streams) * 9
                   for r in rows.values())
        assert rows["eagle"]["by_proposer"].keys() <= {"eagle"} and not rows["K=0 (head)"]["by_proposer"]
    goals = [g["goal"] for g in result["goals"]]
    assert sum(g.startswith("draft >= ") for g in goals) == 2 and sum(g.startswith("eagle >= ") for g in goals) == 2
    assert not any(g.startswith("K=0") for g in goals) and result["cpu"]


def test_eagle_benchmark_quick_measures_a_second_head_and_fixed_k_beside_the_first(llama_pair, eagle_dir, tmp_path):
    target, draft = llama_pair
    result = _run("bench_eagle.py", tmp_path, "--target", str(target), "--draft", str(draft), "--dtype", "float32",
                  "--eagle-head", str(eagle_dir), "--baseline-head", str(eagle_dir), "--fixed-k", "2")
    [table] = result["results"].values()
    assert set(table["cost_ratios"]) == {"draft", "eagle", "baseline"}
    forward = [table["target_forward_ms"][str(t)] for t in range(1, 6)]  # the calibrated verify pass by tokens
    assert forward[0] > 0 and forward == sorted(forward)
    for rows in table["rows"].values():
        assert list(rows) == ["K=0", "draft (hybrid)", "eagle", "eagle (hybrid)", "eagle K=2", "eagle [baseline]",
                              "eagle (hybrid) [baseline]"]
        assert rows["eagle [baseline]"]["by_proposer"].keys() <= {"eagle"}
        fixed = rows["eagle K=2"]["by_proposer"]["eagle"]  # the head drafts at every step that has room for 2
        assert 0 < fixed["num_drafted"] <= 2 * rows["eagle K=2"]["tokens"]
        assert all(r["tokens"] > 0 and r["tokens_per_step"] >= 1 for r in rows.values())


def test_load_benchmark_interval_pairs_each_turn_with_k0(monkeypatch):
    """The interval of a method ÷ K=0: drift that hits both in a turn does not widen it; noise between them does."""
    spec = importlib.util.spec_from_file_location("bench_load", ROOT / "scripts" / "bench_load.py")
    bench_load = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_load", bench_load)  # its dataclasses look their module up there
    spec.loader.exec_module(bench_load)
    base = [{"slices": [(100, 1.0)] * 20 + [(50, 1.0)] * 20}]  # the VM halves its speed halfway
    steady = [{"slices": [(90, 1.0)] * 20 + [(45, 1.0)] * 20}]  # 0.9x of K=0 in every turn
    assert bench_load.ratio_interval(steady, base) == pytest.approx([0.9, 0.9])
    rng = np.random.default_rng(0)
    noisy = [{"slices": [(100 * rng.normal(1.0, 0.1), 1.0) for _ in range(40)]}]
    low, high = bench_load.ratio_interval(noisy, [{"slices": [(100, 1.0)] * 40}])
    assert low < 1.0 < high and high - low > 0.03
    assert bench_load.ratio_interval([{"slices": [(1, 1.0)] * 4}], [{"slices": [(1, 1.0)] * 4}]) is None


def test_history_benchmark_quick_times_every_history_point(tmp_path):
    result = _run("bench_history.py", tmp_path)
    assert set(result["rows"]) == {"plain", "ngram"}
    for row in result["rows"].values():
        assert set(row["step_ms"]) == {"96", "192"} and all(ms > 0 for ms in row["step_ms"].values())
        assert row["step_ratio"]["96"] == row["other_ratio"]["96"] == 1.0 and row["attention_ms"]["192"] > 0


def test_step_overhead_benchmark_quick_splits_every_step_into_forwards_and_overhead(tmp_path):
    result = _run("bench_step_overhead.py", tmp_path)
    assert result["cpu"] and result["threads"] == 1 and result["goal_ms"] == 1.5
    rows = result["rows"]
    assert {(r["batch"], r["method"], r["setting"]) for r in rows.values()} == {
        (b, m, s) for b in (1, 2) for m in ("plain", "ngram", "draft", "eagle")
        for s in ("greedy", "penalties+stop", "sampled")}
    for row in rows.values():
        assert row["step_ms"] > 0 and 0 < row["model_ms"] <= row["passes_ms"] and len(row["samples"]) == 4
    assert all(r["drafted_per_step"] == 0 for r in rows.values() if r["method"] == "plain")
    assert all(r["drafted_per_step"] == 4 * r["batch"] for r in rows.values() if r["method"] in ("draft", "eagle"))


def test_structured_benchmark_quick_reports_speed_grammar_share_and_validity(llama_pair, tmp_path):
    target, draft = llama_pair
    result = _run("bench_structured.py", tmp_path, "--target", str(target), "--draft", str(draft), "--dtype", "float32")
    for rows in result["results"].values():
        assert set(rows) == {"K=0", "ngram", "draft", "hybrid"} and all(r["tokens"] > 0 for r in rows.values())
        assert all(0 < r["grammar_share"] < 1 for r in rows.values())
        assert "grammar" in rows["ngram"]["by_proposer"]  # the schemas' keys are forced
    goals = {g["goal"]: g for g in result["goals"]}
    assert goals["greedy: every method's tokens == K=0's (torch.float32; exact in float32)"]["met"]
