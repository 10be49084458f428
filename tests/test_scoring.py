"""Replace-1-block scores on the tiny parent's library."""

import pandas as pd
import pytest
import torch

from puzzle.blocks.specs import AttentionKind, AttentionSpec, FfnKind, FfnSpec
from puzzle.distill.scoring import ParentReference
from puzzle.api import distill_stage
from puzzle.parents import load_parent
from puzzle.api import score_stage
from tests.helpers import copy_run


@pytest.fixture(scope="module")
def scored(tmp_path_factory, reference_library):
    tmp = tmp_path_factory.mktemp("scoring")
    _, config = copy_run(reference_library[0], tmp, ["scoring.validation_blocks=2", "scoring.batch_size=2"])
    distill_stage(config)  # the session's library, checked and reused
    return config, score_stage(config)


def test_parent_block_scores_zero_kl(scored):
    config, summary = scored
    frame = summary.frame
    parent_rows = frame[(frame.attention == "attention.kv2") & (frame.ffn == "ffn.i96")]
    assert len(parent_rows) == 2  # one per layer
    assert parent_rows.kl.abs().max() < 1e-6  # float32 rounding only
    assert (parent_rows.top1 == 1.0).all()


def test_noop_ffn_scores_worse_than_the_parent_ffn(scored):
    _, summary = scored
    frame = summary.frame
    for layer in (0, 1):
        rows = frame[(frame.layer == layer) & (frame.attention == "attention.kv2")].set_index("ffn")
        assert rows.loc["ffn.noop", "kl"] > rows.loc["ffn.i96", "kl"]


def test_every_block_of_every_layer_is_scored(scored):
    config, summary = scored
    # 5 attention options (kv2, kv1, window8, linear, noop) x 5 FFN options (i96, i48, linear, noop... ) per layer
    per_layer = summary.frame.groupby("layer").size()
    assert (per_layer == 5 * 4).all()
    on_disk = pd.read_csv(config.run.dir / "scores/scores.csv")
    assert len(on_disk) == len(summary.frame)


def test_rescoring_reuses_finished_layers(scored):
    config, _ = scored
    assert score_stage(config).scored_now == 0


def test_noop_everywhere_is_worse_than_noop_in_one_layer(tiny_parent_dir):
    """Sanity of the cached-prefix path: replacing layer 0 by the parent's own layer changes nothing."""
    from puzzle.blocks.init import init_attention, init_ffn

    parent = load_parent(load_config_for(tiny_parent_dir).parent)
    ids = torch.randint(0, 300, (2, 16))
    ref = ParentReference(parent.adapter, ids, batch_size=2)
    layer = parent.adapter.parent_layer(1)
    same = ref.score(1, init_attention(layer.shape.attention, layer), init_ffn(layer.shape.ffn, layer))
    worse = ref.score(1, init_attention(AttentionSpec(AttentionKind.noop), layer), init_ffn(FfnSpec(FfnKind.noop), layer))
    assert same.kl < 1e-6 and worse.kl > 1e-3 and worse.lm_loss != same.lm_loss


def load_config_for(parent_dir):
    from puzzle.config import validate

    return validate({"parent": {"path": str(parent_dir)}, "data": {"files": ["x"]}})


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["replicated", "layers"])
def test_two_processes_score_what_one_does(scored, tmp_path, placement):
    import os
    import subprocess
    import sys

    config, summary = scored
    path, _ = copy_run(config, tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "job/scores")
    overrides = ["--set", "scoring.validation_blocks=2", "--set", "scoring.batch_size=2",
                 "--set", f"run.parent_placement={placement}"]
    result = subprocess.run([sys.executable, "-m", "puzzle", "score", str(path), "--num-processes", "2", *overrides],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    two = pd.read_csv(tmp_path / "job/scores/scores.csv")
    pd.testing.assert_frame_equal(two, summary.frame)
