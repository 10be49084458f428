"""llama.cpp: `puzzle eval --engine llama.cpp`'s parts that need neither its converter nor its runtime, and every
llama.cpp verdict rule against llama.cpp itself (built into .venv by scripts/build_llama_cpp.sh; skipped where
it is not built)."""

import pytest

from puzzle.errors import PuzzleError
from puzzle.llama_cpp import _converted
from puzzle.stages.report import comparison_table, engine_rows
from tests.helpers import engine_check_module


def _script(path, body: str):
    path.write_text(body)
    return path


def test_the_converters_refusal_is_a_one_line_verdict_and_its_gguf_is_reused(tmp_path):
    refuses = _script(tmp_path / "refuses.py", "import sys\nprint('working', file=sys.stderr)\n"
                      "print(\"Can not map tensor 'model.layers.0.self_attn.k_norm.weight'\", file=sys.stderr)\nsys.exit(1)\n")
    with pytest.raises(PuzzleError, match="converter refused .*Can not map tensor 'model.layers.0.self_attn.k_norm"):
        _converted(tmp_path / "child", tmp_path / "out" / "child.gguf", refuses)
    assert not (tmp_path / "out" / "child.gguf").exists()  # no half-written file is left to be reused
    writes = _script(tmp_path / "writes.py", "import sys\nout = sys.argv[sys.argv.index('--outfile') + 1]\n"
                     "open(out, 'w').write('GGUF ' + ' '.join(sys.argv[1:]))\n")
    gguf = _converted(tmp_path / "child", tmp_path / "out" / "child.gguf", writes)
    assert "--outtype f32" in gguf.read_text()
    assert _converted(tmp_path / "child", gguf, refuses) == gguf  # made once, then reused


def test_engine_measurements_sit_beside_each_models_column_of_the_report():
    models = [{"name": n, "kl": kl, "perplexity": 10.0, "top1": 0.9, "parameters": p, "weight_bytes": 4 * p,
               "kv_bytes": 0, "prefill_tokens_per_second": None, "decode_tokens_per_second": None,
               "measured_latency": None, "predicted_latency": lat}
              for n, kl, p, lat in (("parent", 0.0, 100, 2.0), ("child", 0.1, 50, 1.0))]
    results = {"models": models}
    engine_rows(results, {"runs": [
        {"name": "parent", "relative_error": 1e-4, "argmax_agreement": 1.0, "prefill_tokens_per_second": 1000.0,
         "decode_tokens_per_second": 100.0},
        {"name": "child", "relative_error": 2e-4, "argmax_agreement": 0.99, "prefill_tokens_per_second": 1500.0,
         "decode_tokens_per_second": 180.0}]})
    table = comparison_table(results)
    assert table.loc["speedup in llama.cpp (decode / prefill)", "child"] == "1.80x / 1.50x"
    assert table.loc["speedup (predicted by the cost model)", "child"] == "2.00x"
    assert table.loc["llama.cpp logits rel. error / argmax agreement", "child"] == "2.0e-04 / 99.0%"


def test_eval_engine_flags_are_checked_before_any_work(tmp_path, monkeypatch, capsys, tiny_parent_dir):
    from tests.helpers import cli, pipeline_job

    path = pipeline_job(tmp_path, tiny_parent_dir)
    code, (_, err) = cli(monkeypatch, capsys, "eval", path, "--engine", "tensorrt-llm")
    assert code == 2 and "the engines measured here are vllm and llama.cpp" in err and "Traceback" not in err
    code, (_, err) = cli(monkeypatch, capsys, "eval", path, "--engine", "llama.cpp")
    assert code == 2 and "--converter" in err
    assert not (tmp_path / "run").exists()


# --- every llama.cpp verdict against llama.cpp itself (built by scripts/build_llama_cpp.sh into .venv) ---------

def _converter():
    """llama.cpp's converter beside the libllama `make setup` built, or None."""
    import importlib.util
    import sys
    from pathlib import Path

    found = Path(sys.prefix) / "llama.cpp" / "src" / "convert_hf_to_gguf.py"
    return found if found.is_file() and importlib.util.find_spec("llama_cpp") else None


ENGINE_CHECK = engine_check_module()
RUNS = ENGINE_CHECK.children()


@pytest.mark.slow
@pytest.mark.skipif(_converter() is None, reason="llama.cpp is not built in this environment (scripts/build_llama_cpp.sh)")
@pytest.mark.parametrize("run", RUNS, ids=[r[0] for r in RUNS])
def test_the_llama_cpp_verdict_is_what_llama_cpp_does(tmp_path, run):
    from puzzle.engines import Engine, child_reasons, tokenizer_reasons

    name, family, extra, kind, blocks = run
    tok = ENGINE_CHECK.tokenizer(kind)
    tokens = tok(ENGINE_CHECK.TEXT[:2000])["input_ids"][:96]
    config, model = ENGINE_CHECK.realize(tmp_path / "child", ENGINE_CHECK.parent_config(family, extra, len(tok)), blocks,
                                         tok)
    reasons = child_reasons(Engine.llama_cpp, config) + tokenizer_reasons(Engine.llama_cpp, tmp_path / "child")
    seen = ENGINE_CHECK.reality(tmp_path / "child", model, _converter(), tokens)
    assert (not reasons) == seen.startswith("works"), f"verdict {reasons or 'servable'}; llama.cpp: {seen}"


@pytest.mark.slow
@pytest.mark.skipif(_converter() is None, reason="llama.cpp is not built in this environment (scripts/build_llama_cpp.sh)")
def test_llama_cpp_refuses_the_hybrid_children_its_verdict_refuses(tmp_path):
    """llama.cpp's Nemotron-H Puzzle converter: an MoE layer's fused experts and the shipped hybrid parent's
    tokenizer are refused, and the verdicts (with the tokenizer's) say so."""
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from puzzle.blocks.hybrid import hybrid_child_state
    from puzzle.blocks.specs import BlockChoice
    from puzzle.checkpoint import child_config, write_child
    from puzzle.engines import servability
    from puzzle.families import parent_shapes
    from tests.test_vllm import HYBRID_CASES

    source = Path(__file__).parent.parent / "examples/hybrid_parent"
    parent = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokens = tokenizer(ENGINE_CHECK.TEXT[:2000])["input_ids"][:64]
    for i, name in enumerate(["hybrid, the parent's own blocks (an MoE layer)", "hybrid without its MoE layer"]):
        choices = [BlockChoice.from_id(b) for b in HYBRID_CASES[name]]
        config = child_config(parent.config, choices)
        write_child(tmp_path / f"h{i}", config, hybrid_child_state(parent, choices, parent_shapes(parent.config)).items(),
                    dtype=torch.float32, tokenizer=tokenizer, generation_config=None, info={"layers": []})
        model = AutoModelForCausalLM.from_pretrained(tmp_path / f"h{i}", trust_remote_code=True).eval()
        seen = ENGINE_CHECK.reality(tmp_path / f"h{i}", model, _converter(), tokens)
        [verdict] = [v for v in servability(config, tokenizer=source) if v.engine == "llama.cpp"]
        assert seen.startswith("converter refused") and not verdict.servable, (name, seen, verdict.reasons)
        expected = "Unprocessed experts" if "MoE layer)" in name else "pre-tokenizer was not recognized"
        assert expected in seen, seen
    assert any("fused" in r for r in servability(child_config(parent.config, [BlockChoice.from_id(b) for b in
               HYBRID_CASES["hybrid, the parent's own blocks (an MoE layer)"]]))[3].reasons)
