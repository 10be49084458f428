"""`puzzle eval --engine llama.cpp`: the parts that need neither llama.cpp's converter nor its runtime (those are
run by hand with llama-cpp-python installed; docs/benchmarks.md has the numbers)."""

import pytest

from puzzle.errors import PuzzleError
from puzzle.llama_cpp import _converted
from puzzle.stages.report import comparison_table, engine_rows


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
