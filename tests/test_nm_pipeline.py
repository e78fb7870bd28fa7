"""N:M, Wanda and SparseGPT through the pipeline and the CLI: exact patterns, rebuilt weights, clear refusals."""
import json

import pytest
import torch

from explorer import llm, pipeline
from explorer.cli import main
from explorer.layers import effective_weights
from explorer.specs import ModelSpec, PlanSpec, ScoringSpec


def pruned_with(source, criterion, nm="2:4", data=None, include_head=False):
    model, dataset, _ = pipeline.resolve_model(ModelSpec(source=source, data=data, baseline=False))
    prepared = pipeline.prepare(model, ScoringSpec(structure="nm", criterion=criterion, nm=nm, calib_batches=2,
                                                   include_head=include_head), dataset=dataset)
    plan = pipeline.preview(prepared, PlanSpec(sparsity=0.1))  # N:M fixes the sparsity whatever is asked
    return model, prepared, plan, pipeline.apply(model, prepared, plan)


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("nm", ["2:4", "4:8"])
def test_every_criterion_gives_an_exact_nm_pattern_and_leaves_misfit_layers_dense(criterion, nm):
    n, m = llm.parse_nm(nm)
    model, prepared, plan, pruned = pruned_with("lenet5", criterion, nm)
    assert all(layer.sparsity == pytest.approx((m - n) / m) for layer in plan.layers)
    assert set(llm.check_nm(pruned, n, m).values()) == {0}
    for name, weight in effective_weights(pruned).items():
        groups = weight.flatten(1).reshape(weight.shape[0], -1, m) if weight.flatten(1).shape[1] % m == 0 else None
        if name in prepared.scores:
            assert int((groups != 0).sum(-1).max()) <= n, name
        else:  # conv1 (25 inputs) and conv2 (150) fit no 2:4 / 4:8 pattern: kept dense, and the note says so
            assert torch.equal(weight, model.get_submodule(name).weight), name
            assert name in prepared.note


def test_sparsegpt_rebuilds_the_kept_weights_and_magnitude_does_not():
    model, _, _, by_magnitude = pruned_with("lenet5", "magnitude")
    _, _, _, by_sparsegpt = pruned_with("lenet5", "sparsegpt")
    dense = model.classifier.fc2.weight
    kept = effective_weights(by_magnitude)["classifier.fc2"] != 0
    assert torch.equal(effective_weights(by_magnitude)["classifier.fc2"][kept], dense[kept])
    kept = effective_weights(by_sparsegpt)["classifier.fc2"] != 0
    assert not torch.allclose(effective_weights(by_sparsegpt)["classifier.fc2"][kept], dense[kept])


def test_a_tied_lm_head_is_kept_dense_by_sparsegpt_and_the_note_says_why():
    _, prepared, plan, pruned = pruned_with("tiny_gpt2", "sparsegpt", data="text", include_head=True)
    assert "hf.lm_head" not in prepared.scores and "tied" in prepared.note
    assert set(llm.check_nm(pruned, 2, 4, layers=list(prepared.scores)).values()) == {0}


def test_the_cli_fixes_the_nm_sparsity_and_refuses_another(capsys):
    code = main(["prune", "--model", "lenet5", "--structure", "nm", "--nm", "4:8", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["sparsity"] == 0.5 and result["nm"] == {"n": 4, "m": 8}
    assert result["recipe"]["scoring"]["nm"] == "4:8" and "conv1" in result["note"]
    code = main(["prune", "--model", "lenet5", "--structure", "nm", "--sparsity", "0.3"])
    err = capsys.readouterr().err
    assert code == 2 and "fixes the sparsity at 0.5" in err and len(err.strip().splitlines()) == 1
    code = main(["prune", "--model", "lenet5", "--structure", "nm", "--nm", "4:2"])
    assert code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_sparsegpt_has_no_channel_form():
    model, dataset, _ = pipeline.resolve_model(ModelSpec(source="lenet5", baseline=False))
    with pytest.raises(Exception, match="unstructured or nm"):
        pipeline.prepare(model, ScoringSpec(structure="channel", criterion="sparsegpt", calib_batches=1),
                         dataset=dataset)
