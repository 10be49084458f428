"""The memory plan, and BLD in the groups it packs."""

from dataclasses import replace
from pathlib import Path

import pandas as pd
from safetensors.torch import load_file

from puzzle.api import distill_stage
from puzzle.config import load_config
from puzzle.distill.library import bld_candidates
from puzzle.memory import (
    GIB, PACKING_SHARE, Phase, StagePlan, Target, Term, _bld_fixed, _bld_held, _calibration_activations,
    _candidate_bytes, _fit_statistics_bytes, _linear_subblocks, bld_groups, candidate_params, linear_fit_slots,
    model_shape, pack, target,
)
from puzzle.distill.bld import linear_slots
from puzzle.parents import load_parent, parent_config
from puzzle.preflight import job_plan
from puzzle.rundir import Stage
from puzzle.stages.library import job_spaces
from tests.helpers import cli, write_job

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_pack_balances_by_bytes_under_the_capacity():
    sizes = [9, 7, 6, 5, 4, 3, 2, 2, 1]
    groups = pack(sizes, capacity=14)
    loads = sorted(sum(sizes[i] for i in g) for g in groups)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    assert len(groups) == 3 and loads == [13, 13, 13]  # 39 bytes in the fewest groups of at most 14
    assert len(pack(sizes, capacity=100, min_groups=4)) == 4  # at least one group per rank
    assert pack(sizes, capacity=8) is None  # the 9 fits nowhere


def test_llama_8b_fits_one_h100_in_groups_and_70b_says_what_does_not():
    eight = job_plan(load_config(EXAMPLES / "llama-3.1-8b.yaml"), device="h100", gpus=1)
    library = eight.stage(Stage.library)
    assert eight.fits(Stage.library) and library.groups > 1
    assert library.peak(eight.target) <= 80 * 2**30
    on_eight = job_plan(load_config(EXAMPLES / "llama-3.1-8b.yaml"), device="h100", gpus=8)
    assert on_eight.stage(Stage.library).groups == 8  # one group per rank, each lighter
    assert on_eight.stage(Stage.library).peak(on_eight.target) < library.peak(eight.target)
    seventy = job_plan(load_config(EXAMPLES / "llama-3.1-70b.yaml"), device="h100", gpus=1)
    problems = seventy.problems([Stage.library])
    assert len(problems) == 1 and "parent weights, 131.42 GiB" in problems[0]
    assert "holds the whole parent on each rank" in problems[0]


def test_kd_of_an_8b_child_fits_8_h100s_only_sharded():
    sharded = load_config(EXAMPLES / "llama-3.1-8b.yaml")  # kd.shard and kd.activation_checkpointing on
    whole = load_config(EXAMPLES / "llama-3.1-8b.yaml", ["kd.shard=false", "kd.activation_checkpointing=false"])
    assert job_plan(sharded, device="h100", gpus=8).fits(Stage.kd)
    assert not job_plan(sharded, device="h100", gpus=1).fits(Stage.kd)  # nothing to shard over
    assert not job_plan(whole, device="h100", gpus=8).fits(Stage.kd)
    per_rank = {t.name: t.bytes for t in job_plan(sharded, device="h100", gpus=8).stage(Stage.kd).terms}
    full = {t.name: t.bytes for t in job_plan(whole, device="h100", gpus=8).stage(Stage.kd).terms}
    assert per_rank["child: fp32 weights, grads, AdamW, 1/8 per rank (FSDP2)"] * 8 == full["child: fp32 weights, grads, AdamW"]


def test_kd_batch_that_does_not_split_over_the_processes_stops_before_writing(tmp_path, tiny_parent_dir, monkeypatch,
                                                                              capsys):
    job = write_job(tmp_path, tiny_parent_dir)
    code, captured = cli(monkeypatch, capsys, "kd", str(job), "--set", "kd.batch_size=3", "--num-processes", "2")
    assert code == 2 and "kd.batch_size: 3 does not split over 2 processes" in captured.err
    assert not (tmp_path / "job").exists()


def test_plan_says_every_stage_of_a_70b_run_fits_8_h100s_and_exits_2_on_one(monkeypatch, capsys):
    code, captured = cli(monkeypatch, capsys, "plan", str(EXAMPLES / "llama-3.1-70b.yaml"), "--device", "h100", "--gpus", "8")
    assert code == 0, captured.err
    assert "memory plan per rank on h100" in captured.out
    for stage in ("parent", "library", "scores", "child", "kd", "eval"):
        assert stage in captured.out
    assert "note (puzzle fuse runs only when asked for" in captured.out  # fuse holds the whole parent: not run's
    plan = job_plan(load_config(EXAMPLES / "llama-3.1-70b.yaml"), device="h100", gpus=8)
    terms = {stage: {t.name: t.bytes for t in plan.stage(stage).terms} for stage in (Stage.parent, Stage.kd, Stage.eval)}
    parent_bytes = model_shape(plan_config := load_config(EXAMPLES / "llama-3.1-70b.yaml"),
                               parent_config(plan_config.parent)).weight_bytes
    for stage in (Stage.parent, Stage.eval):
        assert terms[stage]["parent weights, 1/8 per rank (FSDP2)"] == parent_bytes / 8
    assert terms[Stage.kd]["parent (teacher) weights, 1/8 per rank (FSDP2)"] == parent_bytes / 8
    offloaded = next(t for t in plan.stage(Stage.kd).terms if "kd.offload" in t.name)
    assert offloaded.host and plan.stage(Stage.kd).peak(plan.target) < 80 * 2**30 < offloaded.bytes
    assert plan.stage(Stage.child).peak(plan.target) == 2**30  # realize streams on the host: the CUDA context only
    code, captured = cli(monkeypatch, capsys, "plan", str(EXAMPLES / "llama-3.1-70b.yaml"), "--device", "h100")
    assert code == 2 and "stage parent needs" in captured.err


def _limit_for_groups(config, groups: int) -> float:
    """A run.memory_limit under which BLD of `config` needs about `groups` groups here."""
    model = model_shape(config, parent_config(config.parent))
    candidates = bld_candidates(job_spaces(config, list(model.shapes)), list(model.shapes))
    tgt = target(config)
    sizes = [_candidate_bytes(candidate_params(c, model.shapes[c.layer]), tgt) for c in candidates]
    fixed = sum(t.bytes for t in _bld_fixed(config, model, tgt, max(sizes)))
    return fixed + sum(sizes) / groups / PACKING_SHARE * 1.05


def test_a_library_trained_in_groups_equals_the_one_group_library(tmp_path, tiny_parent_dir, reference_library):
    reference, summary = reference_library
    config = load_config(write_job(tmp_path, tiny_parent_dir))
    limit = _limit_for_groups(config, 3)
    grouped = load_config(write_job(tmp_path, tiny_parent_dir), [f"run.memory_limit={limit:.0f}B"])
    model = model_shape(grouped, parent_config(grouped.parent))
    candidates = bld_candidates(job_spaces(grouped, list(model.shapes)), list(model.shapes))
    assert len(bld_groups(grouped, model, candidates, target(grouped))[0]) >= 3
    assert len(bld_groups(reference, model, candidates, target(reference))[0]) == 1
    result = distill_stage(grouped)
    assert result.groups >= 3
    ours, theirs = (pd.read_csv(d / "table.csv") for d in (result.directory, summary.directory))
    pd.testing.assert_frame_equal(ours.drop(columns="trained_now"), theirs.drop(columns="trained_now"), rtol=1e-6)
    for entry in sorted((summary.directory / "entries").glob("*.safetensors")):
        a, b = load_file(entry), load_file(result.directory / "entries" / entry.name)
        for key in a:
            assert (a[key] - b[key]).abs().max().item() <= 1e-6, f"{entry.name} {key}"


def test_a_stage_that_cannot_fit_stops_before_writing(tmp_path, tiny_parent_dir, monkeypatch, capsys):
    job = write_job(tmp_path, tiny_parent_dir)
    code, captured = cli(monkeypatch, capsys, "distill", str(job), "--set", "run.memory_limit=200MiB")
    assert code == 2
    lines = [line for line in captured.err.splitlines() if line.strip().startswith("memory plan:")]
    assert len(lines) == 1 and "stage library needs" in lines[0] and "run.memory_limit" in lines[0]
    assert "Traceback" not in captured.err
    assert not (tmp_path / "job").exists()


def test_a_bld_pipeline_over_more_processes_than_layers_stops_before_writing(tmp_path, tiny_parent_dir, monkeypatch,
                                                                            capsys):
    job = write_job(tmp_path, tiny_parent_dir)
    code, captured = cli(monkeypatch, capsys, "distill", str(job), "--set", "run.parent_placement=layers",
                         "--num-processes", "3")
    assert code == 2 and "run.parent_placement: layers over 3 processes needs at least 3 layers" in captured.err
    assert not (tmp_path / "job").exists()


def test_the_plan_holds_a_share_of_the_70b_parent_per_rank_in_a_pipeline():
    config = load_config(EXAMPLES / "llama-3.1-70b.yaml", ["run.parent_placement=layers"])
    plan = job_plan(config, device="h100", gpus=8)
    library = plan.stage(Stage.library)
    assert plan.fits(Stage.library) and "pipeline of 8 layer shares" in library.note
    parent = next(t for t in library.terms if t.name.startswith("parent layers"))
    assert parent.bytes < 0.15 * 131.42 * 2**30  # 10 of 80 layers and the embeddings


def test_the_plan_scores_70b_on_8_h100s_as_a_pipeline():
    config = load_config(EXAMPLES / "llama-3.1-70b.yaml")  # run.parent_placement: layers
    assert job_plan(config, device="h100", gpus=8).fits(Stage.scores)
    assert not job_plan(config, device="h100", gpus=1).fits(Stage.scores)


def test_auto_placement_splits_the_parent_only_when_the_whole_one_does_not_fit(tiny_parent_dir, tmp_path):
    seventy = load_config(EXAMPLES / "llama-3.1-70b.yaml", ["run.parent_placement=auto"])
    plan = job_plan(seventy, device="h100", gpus=8)
    assert plan.fits(Stage.library) and plan.fits(Stage.scores)
    assert "chosen: the whole parent does not fit" in plan.stage(Stage.library).note
    tiny = load_config(write_job(tmp_path, tiny_parent_dir))  # fits whole: every rank keeps the whole parent
    assert "pipeline" not in job_plan(tiny, processes=2).stage(Stage.library).note


def test_multi_process_eval_of_what_runs_on_one_process_stops_before_writing(tmp_path, tiny_parent_dir, monkeypatch,
                                                                             capsys):
    job = write_job(tmp_path, tiny_parent_dir)
    code, captured = cli(monkeypatch, capsys, "run", str(job), "--set", "eval.kv_dtype=fp8", "--set",
                         "search.budgets.latency=0.5x",
                         "--num-processes", "2")
    assert code == 2 and "runs on one process" in captured.err and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 2  # the file's line and one problem
    assert not (tmp_path / "job").exists()


def test_least_squares_statistics_take_the_room_beside_the_parent(tmp_path, tiny_parent_dir):
    """Linear candidates' calibration passes fit as many subblocks' statistics as the memory beside the parent
    and a calibration batch holds (at least one), and the plan counts what the library stage will hold."""
    config = load_config(write_job(tmp_path, tiny_parent_dir))
    model = model_shape(config, parent_config(config.parent))
    candidates = bld_candidates(job_spaces(config, list(model.shapes)), list(model.shapes))
    tgt = target(config)
    subblocks, each = _linear_subblocks(candidates), _fit_statistics_bytes(model.hidden_size)
    assert subblocks == len(linear_slots(candidates, load_parent(config.parent).adapter)) >= 2
    beside = sum(t.bytes for t in [*_bld_held(model, tgt), _calibration_activations(config, model, None)])
    one = replace(tgt, capacity=beside + 1.5 * each / PACKING_SHARE)
    assert linear_fit_slots(config, model, candidates, one) == 1
    assert linear_fit_slots(config, model, candidates, replace(tgt, capacity=beside)) == 1
    assert linear_fit_slots(config, model, candidates, tgt) == subblocks
    statistics = next(t for t in bld_groups(config, model, candidates, one)[1].terms if "least-squares" in t.name)
    assert statistics.bytes == each and f"1 of {subblocks}" in statistics.name


def test_a_stage_peak_counts_the_heaviest_of_its_phases_once():
    tgt = Target("gpu", 10 * GIB, 1, True, "")
    plan = StagePlan(Stage.library, (Term("parent", 4), Term("statistics", 3, phase=Phase.calibration),
                                     Term("calibration batch", 1, phase=Phase.calibration),
                                     Term("candidates", 2, phase=Phase.training), Term("host copy", 9, host=True)), ranks=1)
    assert plan.peak(tgt) == 4 + 3 + 1
    assert plan.peak(replace(tgt, is_gpu=False)) == 4 + 9 + 3 + 1
