"""Transformers end to end through the CLI: built-in text, the task metric, heads, the real pretrained MiniLM."""
import json

import pytest

from explorer.cli import main
from explorer.specs import DEFAULT_EVAL_TOKENS


def prune(capsys, *argv):
    code = main(["prune", *argv, "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return [json.loads(line) for line in out.out.splitlines()]


def test_a_causal_lm_is_judged_by_perplexity_and_the_json_names_it(capsys):
    results = prune(capsys, "--model", "tiny_gpt2", "--data", "text", "--structure", "unstructured",
                    "--criterion", "magnitude", "--scope", "global", "--sparsity", "0.5,0.9")
    assert [r["task"]["name"] for r in results] == ["perplexity", "perplexity"]
    assert all("accuracy" not in r for r in results)
    assert results[0]["task"]["base"] == results[1]["task"]["base"] > 1
    assert results[1]["params"]["nonzero"] < results[0]["params"]["nonzero"] < results[0]["params"]["total"]


def test_heads_removed_from_tiny_bert_shrink_parameters_and_report_fidelity(capsys):
    (result,) = prune(capsys, "--model", "tiny_bert", "--structure", "head", "--criterion", "magnitude",
                      "--sparsity", "0.5")
    assert result["task"]["name"] == "fidelity" and result["task"]["measure"] == "top1"  # unlabelled text
    assert 0 <= result["task"]["pruned"] <= 1 and result["task"]["base"] == 1.0
    assert result["params"]["total"] < result["params"]["dense_total"]
    attention = [layer for layer in result["layers"] if layer["name"].endswith("attention.self.query")]
    assert attention and all(layer["total"] == 4 and layer["kept"] == 2 for layer in attention)


def test_a_2_4_prune_reports_the_sparse_kernels_or_why_there_are_none(capsys):
    import torch

    (result,) = prune(capsys, "--model", "tiny_bert", "--structure", "nm", "--nm", "2:4", "--criterion", "magnitude")
    semi = result["semi_structured"]
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
        assert semi["available"] and semi["speedup"] is not None
    else:  # the CPU (and CI) case: dense kernels do the work on the zeros, and the JSON says so
        assert semi["available"] is False and "CPU" in semi["reason"]
    (other,) = prune(capsys, "--model", "tiny_bert", "--structure", "unstructured", "--criterion", "magnitude",
                     "--sparsity", "0.3")
    assert "semi_structured" not in other  # no weight carries a 2:4 pattern


def test_the_real_pretrained_minilm_prunes_end_to_end(capsys):
    pytest.importorskip("transformers")
    (result,) = prune(capsys, "--model", "minilm", "--structure", "unstructured", "--criterion", "magnitude",
                      "--scope", "local", "--sparsity", "0.5")
    assert result["task"]["name"] == "fidelity" and result["task"]["measure"] == "cosine"
    assert 0.2 < result["task"]["pruned"] < 0.999  # real weights: half of them gone costs something, not all
    assert result["sparsity_actual"] == pytest.approx(0.5, abs=1e-3)


def test_text_data_for_an_image_model_is_one_line(capsys):
    code = main(["prune", "--model", "mlp", "--data", "text", "--sparsity", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "tokenizer" in err


def test_a_causal_lms_perplexity_says_how_many_test_tokens_it_read_by_default_and_with_eval_tokens_0(capsys):
    from explorer import pipeline, tasks
    from explorer.specs import ModelSpec

    model, dataset, _ = pipeline.resolve_model(ModelSpec("tiny_gpt2", data="text"))
    scored, total = tasks.eval_tokens(dataset, "test", DEFAULT_EVAL_TOKENS)
    argv = ["prune", "--model", "tiny_gpt2", "--data", "text", "--criterion", "magnitude", "--sparsity", "0.5"]
    assert main(argv) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "test perplexity" in line)
    base = tasks.perplexity(model, dataset, max_tokens=DEFAULT_EVAL_TOKENS)
    assert line.endswith(f"(no fine-tune) on the first {scored:,} of {total:,} test tokens; --eval-tokens 0 for all")
    assert f" {base:.4g} -> " in line
    (whole,) = prune(capsys, *argv[1:], "--eval-tokens", "0")
    assert whole["task"]["tokens"] == {"scored": total, "total": total}
    assert whole["recipe"]["measure"]["eval_tokens"] == 0
    assert whole["task"]["base"] == pytest.approx(tasks.perplexity(model, dataset), rel=1e-6)
    assert main([*argv, "--eval-tokens", "0"]) == 0
    assert f"(no fine-tune) on all {total:,} test tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*argv, "--eval-tokens", "-5"])
    assert "--eval-tokens: expected a whole number from 0 to" in capsys.readouterr().err
