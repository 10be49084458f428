"""target.engine: the library and the search offer only what the engine serves, by the verdicts' own rules."""

import pytest

from puzzle.api import search_stage, with_settings
from puzzle.checkpoint import child_config
from puzzle.config import load_config
from puzzle.distill.library import Library
from puzzle.engines import Engine, child_reasons
from puzzle.parents import parent_config
from puzzle.preflight import engine_removals, preflight
from puzzle.rundir import RunDir, Stage
from tests.helpers import FAST, grid_llama, scored_job, write_job


@pytest.fixture(scope="module")
def grid_parent(tmp_path_factory):
    return grid_llama(tmp_path_factory.mktemp("grid_parent"), hidden_size=64)


@pytest.fixture(scope="module")
def scored(tmp_path_factory, grid_parent):
    """Library (windows, linear and removed subblocks, widths 384 off the grid and 256 on it), scores, profile."""
    library = ["library.ffn_fractions=[0.75, 0.5]", "library.linear_attention=true", "library.linear_ffn=true"]
    return scored_job(tmp_path_factory.mktemp("engines"), grid_parent, FAST + library)[1]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["vllm", "llama.cpp"])
def test_a_targeted_search_never_picks_a_block_its_engine_refuses(scored, engine):
    config = with_settings(scored, [f"target.engine={engine}", "search.solutions=4", "search.min_diff=1"])
    hf_config = parent_config(config.parent)
    for budget in ("params=0.5x", "latency=0.6x"):  # 0.5x is at the edge of what the measured profile allows
        outcome = search_stage(config, [budget])
        assert outcome.solutions
        for solution in outcome.solutions:
            assert child_reasons(Engine(engine), child_config(hf_config, solution.blocks)) == []
    # The untargeted library held what the engine refuses, so the filter had something to remove.
    assert any("window" in r for r in engine_removals(config))
    assert any(s.window for space in Library(RunDir.of(scored).stage_dir(Stage.library), None).layers
               for s in space.attention)


def test_validate_names_what_the_target_removes_and_refuses_a_parent_the_engine_cannot_serve(
        tmp_path, grid_parent, tiny_parent_dir):
    config = load_config(write_job(tmp_path, grid_parent), ["library.ffn_fractions=[0.75, 0.5]",
                                                           "library.linear_ffn=true", "target.engine=llama.cpp"])
    removed = engine_removals(config)
    assert any(r.startswith("ffn.i384 (FFN width 384 is off the 256 grid") for r in removed)
    assert any(r.startswith("ffn.linear") for r in removed) and not any(r.startswith("ffn.i256") for r in removed)
    assert not any(p.startswith("target.engine") for p in preflight(config))
    # The tiny parent's own FFN (96 wide) is off the grid: no child of it keeps every layer servable.
    off_grid = load_config(write_job(tmp_path, tiny_parent_dir, name="off"), ["target.engine=llama.cpp"])
    [problem] = [p for p in preflight(off_grid) if p.startswith("target.engine")]
    assert "cannot serve this parent: the parent's layer 0: FFN width 96 is off the 256 grid" in problem
