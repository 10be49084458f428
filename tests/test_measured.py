"""Children measured in memory from the library (puzzle/measured.py): the realized child's KL, shared work
where children agree."""

import itertools

import pytest
import torch

from puzzle.checkpoint import build_child
from puzzle.data import job_blocks
from puzzle.distill.library import Library
from puzzle.distill.metrics import hf_logits, quality
from puzzle.measured import ChildMeter
from puzzle.parents import load_parent


@pytest.fixture(scope="module")
def meter_and_children(fast_scored):
    config = fast_scored
    parent = load_parent(config.parent)
    library = Library(config.run.dir / "library", parent.adapter)
    blocks = job_blocks(config, parent.tokenizer).calibration(4)
    # Every pair of layer blocks the library offers, with a few coupled ones among them.
    layers = [space.blocks()[:4] for space in library.layers]
    children = [tuple(c) for c in itertools.product(*layers)]
    return parent, library, blocks, children


def test_measured_kl_is_the_realized_childs(meter_and_children):
    parent, library, blocks, children = meter_and_children
    meter = ChildMeter(parent, library, blocks, batch_size=2)
    for child in children[:: max(1, len(children) // 4)]:
        [measured] = meter.kl([child])
        realized = build_child(parent, library, list(child))
        expected = quality(parent.adapter.logits, {"child": hf_logits(realized)}, blocks, 2)[0]["child"]["kl"]
        assert measured == pytest.approx(expected, rel=1e-4, abs=1e-7), child


def test_children_measured_together_equal_each_alone_and_the_parent_is_zero(meter_and_children):
    parent, library, blocks, children = meter_and_children
    meter = ChildMeter(parent, library, blocks, batch_size=2)
    together = meter.kl(children)
    assert meter.evaluations == len(children)
    alone = [ChildMeter(parent, library, blocks, batch_size=2).kl([c])[0] for c in children[:3]]
    assert together[:3] == pytest.approx(alone, rel=1e-6, abs=1e-9)
    own = tuple(type(children[0][0])(s.attention, s.ffn) for s in parent.adapter.shapes)
    assert meter.kl([own])[0] == pytest.approx(0.0, abs=1e-5)
    assert len(set(round(x, 8) for x in together)) > 1


def test_fewer_batches_measure_fewer_tokens(meter_and_children):
    parent, library, blocks, children = meter_and_children
    meter = ChildMeter(parent, library, blocks, batch_size=2)
    first, whole = meter.kl(children[:2], batches=1), meter.kl(children[:2])
    assert first != whole and torch.isfinite(torch.tensor(first)).all()
