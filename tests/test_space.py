import pydantic
import pytest

from puzzle.errors import PuzzleError
from puzzle.blocks.space import SpaceOptions, attention_candidates, check_not_empty, ffn_candidates, pruned_size
from puzzle.blocks.specs import AttentionKind, AttentionSpec, FfnKind, FfnSpec, ParentShape, needs_training, spec_from_id

SHAPE = ParentShape(hidden_size=192, num_attention_heads=6, num_key_value_heads=2, head_dim=32, intermediate_size=512)
DEFAULT = SpaceOptions(
    kv_heads="divisors", windows=(64, 128), linear_attention=True, noop_attention=True,
    ffn_fractions=(0.875, 0.75, 0.5, 0.25, 0.1), ffn_sizes=(), ffn_grid=None, linear_ffn=True, noop_ffn=True,
)


def options(**changes):
    return SpaceOptions(**{**DEFAULT.model_dump(), **changes})


def test_default_space_ids():
    assert [s.id for s in attention_candidates(SHAPE, DEFAULT)] == [
        "attention.kv2", "attention.kv1", "attention.kv2.window64", "attention.kv2.window128",
        "attention.linear", "attention.noop",
    ]
    assert [s.id for s in ffn_candidates(SHAPE, DEFAULT)] == [
        "ffn.i512", "ffn.i448", "ffn.i384", "ffn.i256", "ffn.i128", "ffn.i51", "ffn.linear", "ffn.noop",
    ]


def test_ids_round_trip():
    for spec in attention_candidates(SHAPE, DEFAULT) + ffn_candidates(SHAPE, DEFAULT):
        assert spec_from_id(spec.id) == spec
    with pytest.raises(ValueError, match="not a candidate id"):
        spec_from_id("attention.kv2.wide")
    mamba = AttentionSpec(AttentionKind.mamba, mamba_num_heads=6)
    assert mamba.id == "attention.mamba6" and spec_from_id("attention.mamba6") == mamba
    for bad in (dict(mamba_num_heads=None), dict(mamba_num_heads=0)):
        with pytest.raises(ValueError, match="mamba_num_heads"):
            AttentionSpec(AttentionKind.mamba, **bad)
    with pytest.raises(ValueError, match="mamba_num_heads"):
        AttentionSpec(AttentionKind.attention, 2, mamba_num_heads=4)


def test_grid_rounds_pruned_sizes_up():
    assert pruned_size(0.1, 512, 256) == 256
    assert pruned_size(0.875, 512, 256) == 512
    specs = ffn_candidates(SHAPE, options(ffn_grid=256))
    assert [s.id for s in specs if s.kind is FfnKind.dense] == ["ffn.i512", "ffn.i256"]


def test_specs_are_frozen_and_checked():
    spec = AttentionSpec(AttentionKind.attention, 2, 64)
    with pytest.raises(Exception):
        spec.window = 3
    with pytest.raises(ValueError):
        AttentionSpec(AttentionKind.linear, 2)
    with pytest.raises(ValueError):
        FfnSpec(FfnKind.dense, 0)


def test_parent_and_noop_need_no_training():
    assert not needs_training(SHAPE.attention, SHAPE)
    assert not needs_training(FfnSpec(FfnKind.noop), SHAPE)
    assert needs_training(AttentionSpec(AttentionKind.attention, 2, 64), SHAPE)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(kv_heads=(3,)), "3 does not divide the parent's 2 KV heads"),
        (dict(ffn_sizes=(600,)), "600 is outside 1..512"),
    ],
)
def test_bad_options_are_named(changes, message):
    with pytest.raises(PuzzleError, match=message):
        attention_candidates(SHAPE, options(**changes))
        ffn_candidates(SHAPE, options(**changes))


# Ranges that need no parent are checked when the options are made (the config's library section).
@pytest.mark.parametrize("changes, message", [
    (dict(ffn_fractions=(1.5,)), "ffn_fractions.0\n  Input should be less than or equal to 1"),
    (dict(ffn_fractions=(0.0,)), "ffn_fractions.0\n  Input should be greater than 0"),
    (dict(windows=(0,)), "windows.0\n  Input should be greater than 0"),
])
def test_bad_ranges_are_refused_when_the_options_are_made(changes, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        options(**changes)


def test_empty_library_is_an_error():
    empty = options(kv_heads=(2,), windows=(), linear_attention=False, noop_attention=False, ffn_fractions=(),
                    linear_ffn=False, noop_ffn=False)
    with pytest.raises(PuzzleError, match="candidate list is empty"):
        check_not_empty(attention_candidates(SHAPE, empty), ffn_candidates(SHAPE, empty))
