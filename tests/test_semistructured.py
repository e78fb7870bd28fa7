"""2:4 semi-structured timing: which machines and layers qualify (pure, CPU), the GPU path where CUDA is."""
import pytest
import torch
import torch.nn as nn

from explorer import semistructured as semi
from explorer.layers import fold_masks
from explorer.llm import nm_scores
from explorer import masking, planner


def _two_four(rows: int, cols: int) -> nn.Linear:
    """A Linear whose weight keeps exactly inputs 0 and 3 of every group of 4 (built by hand)."""
    linear = nn.Linear(cols, rows)
    keep = torch.tensor([1.0, 0.0, 0.0, 1.0]).repeat(rows, cols // 4)
    with torch.no_grad():
        linear.weight.mul_(keep)
    return linear


def test_reasons_for_machines_without_sparse_tensor_cores():
    assert "No CUDA GPU" in semi.unavailable_reason(False) and "1x" in semi.unavailable_reason(False)
    turing = semi.unavailable_reason(True, (7, 5), "Tesla T4")
    assert "Tesla T4" in turing and "7.5" in turing and "8.0" in turing
    assert semi.unavailable_reason(True, (8, 0)) is None and semi.unavailable_reason(True, (9, 0)) is None


def test_is_2_4_counts_non_zeros_per_group_of_four():
    assert semi.is_2_4(_two_four(32, 64).weight)
    three = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert not semi.is_2_4(three)
    assert not semi.is_2_4(torch.zeros(4, 6))  # 6 inputs: no whole groups of 4
    assert semi.is_2_4(torch.zeros(4, 8))


def test_layer_refusals_say_why():
    assert semi.layer_refusal(_two_four(32, 64)) is None
    assert semi.layer_refusal(_two_four(32, 64), kernel="cutlass") is None
    assert "not a Linear" in semi.layer_refusal(nn.Conv2d(4, 8, 3))
    assert "multiple of 16" in semi.layer_refusal(_two_four(24, 64))  # cuSPARSELt: rows 16, 32, ...
    assert "multiple of 32" in semi.layer_refusal(_two_four(48, 64), kernel="cutlass")
    assert "columns a multiple of 64" in semi.layer_refusal(_two_four(32, 96), kernel="cutlass")
    assert "not 2:4" in semi.layer_refusal(nn.Linear(64, 32))
    assert "dtype" in semi.layer_refusal(_two_four(32, 64), dtype=torch.float32)


def test_minimum_shapes_match_torchs_own_table():
    sparse = torch.sparse
    for kernel, cls in (("cusparselt", sparse.SparseSemiStructuredTensorCUSPARSELT),
                        ("cutlass", sparse.SparseSemiStructuredTensorCUTLASS)):
        for dtype, (rows, cols) in semi.SPARSE_MIN_SHAPE[kernel].items():
            constraint = cls._DTYPE_SHAPE_CONSTRAINTS[dtype]
            assert (constraint.sparse_min_rows, constraint.sparse_min_cols) == (rows, cols)


def test_eligible_layers_of_a_real_2_4_plan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    scores = {name: m.weight.detach().abs() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    ranking = planner.prepare(nm_scores(scores, 2, 4))
    pruned = fold_masks(masking.apply(model, planner.plan(ranking, 0.5, "local"), ranking))
    converted, refused = semi.eligible_layers(pruned)
    assert converted == ["0"]  # 48 x 64, 2:4
    assert "multiple of 16" in refused["2"]  # 10 rows
    assert semi.has_2_4_layer(pruned) and not semi.has_2_4_layer(model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answer")
def test_without_cuda_the_answer_is_the_reason_and_no_timing():
    result = semi.semi_structured_latency(nn.Sequential(_two_four(32, 64)), torch.randn(8, 64))
    assert result == {"available": False, "reason": semi.CPU_REASON}


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs a CUDA GPU of compute capability 8.0+")
def test_semi_structured_timing_on_a_capable_gpu():
    model = nn.Sequential(_two_four(1024, 1024), nn.ReLU(), _two_four(1024, 1024)).eval()
    result = semi.semi_structured_latency(model, torch.randn(512, 1024), min_run_time=0.2)
    assert result["available"] and result["layers_converted"] == 2
    assert result["dense_ms"] > 0 and result["sparse_ms"] > 0
    assert result["speedup"] == pytest.approx(result["dense_ms"] / result["sparse_ms"])


def test_measure_run_reports_the_2_4_case_and_only_it():
    from explorer import pipeline
    from explorer.specs import MeasureSpec, ModelSpec, PlanSpec, ScoringSpec

    model, dataset, _ = pipeline.resolve_model(ModelSpec(source="lenet5", baseline=False))
    spec = MeasureSpec(latency=False, batch=8)
    results = {}
    for structure in ("nm", "unstructured"):
        prepared = pipeline.prepare(model, ScoringSpec(structure=structure, criterion="magnitude"), dataset=dataset)
        pruned = pipeline.apply(model, prepared, pipeline.preview(prepared, PlanSpec(sparsity=0.5)))
        results[structure] = pipeline.measure_run(model, pruned, dataset, spec)["semi_structured"]
    assert results["unstructured"] is None
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
        assert results["nm"]["available"] and results["nm"]["dense_ms"] is None  # latency off: not timed
    else:
        assert results["nm"]["available"] is False and results["nm"]["reason"] == semi.machine_reason()


def test_describe_gives_one_line_for_every_case():
    assert semi.describe(None) is None
    assert "2:4 only" in semi.describe(None, "4:8")
    assert semi.describe({"available": False, "reason": semi.CPU_REASON}).endswith(semi.CPU_REASON)
    timed = {"available": True, "reason": None, "device": "NVIDIA A100", "capability": "8.0", "backend": "cusparselt",
             "dtype": "float16", "batch": 64, "dense_ms": 2.0, "sparse_ms": 1.25, "speedup": 1.6,
             "layers_converted": 36, "layers_refused": {"hf.pooler.dense": "not 2:4"}}
    line = semi.describe(timed)
    assert "NVIDIA A100" in line and "1.60x" in line and "36 Linear layers converted, 1 kept dense" in line
    assert "latency measurement is off" in semi.describe({**timed, "dense_ms": None, "sparse_ms": None, "speedup": None,
                                                          "reason": "Not timed: latency measurement is off."})


def test_the_prune_page_says_what_2_4_kernels_give_here(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("PRUNING_EXPLORER_DATA", str(tmp_path / "data"))
    at = AppTest.from_file("../app.py", default_timeout=120)
    at.query_params["model"], at.query_params["data"], at.query_params["structure"] = "tiny_bert", "text", "nm"
    at.switch_page("app_pages/prune.py").run()
    at.button(key="prune_apply").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    semi_result = at.session_state["pruned_result"]["metrics"]["semi_structured"]
    captions = "\n".join(c.value for c in at.caption)
    assert semi.describe(semi_result) in captions
    if not torch.cuda.is_available():
        assert "No CUDA GPU" in captions


def test_a_kernel_failure_becomes_the_reason_not_a_lost_run(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("fakes a capable GPU on a machine without one")
    monkeypatch.setattr(semi, "machine_reason", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    result = semi.semi_structured_latency(nn.Sequential(_two_four(32, 64)), torch.randn(8, 64))
    assert result["available"] is False and result["layers_converted"] == 1
    assert result["reason"].startswith("The semi-structured kernels failed on this model in float16")
    assert semi.describe(result).endswith(result["reason"])


def test_compare_shows_the_2_4_kernel_speed_up_or_why_there_is_none(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from explorer.store import Run, RunStore

    monkeypatch.setenv("PRUNING_EXPLORER_DATA", str(tmp_path))  # a run database of this test's runs only
    task = {"name": "fidelity", "measure": "cosine", "base": 1.0, "pruned": 0.9, "higher_is_better": True}
    for speedup, semi in ((1.4, {"available": True, "speedup": 1.4}),
                          (None, {"available": False, "reason": "No CUDA GPU here. On CPU, dense kernels ..."})):
        RunStore().save(Run(model_name="minilm", dataset="text", structure="nm", criterion="magnitude", scope="local",
                            sparsity=0.5, metrics={"task": task, "semi_structured": semi}))
    at = AppTest.from_file("../app_pages/compare.py", default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    assert sorted(at.dataframe[0].value["speed-up 2:4 kernels"]) == ["1.40x", "—"]  # a dash, never 'None'
    assert "2:4 kernels x" in at.dataframe[0].proto.columns and "speed-up 2:4 kernels" in at.dataframe[0].proto.column_order
    assert "2:4 sparse kernels: No CUDA GPU here" in "\n".join(c.value for c in at.caption)
    RunStore().delete(next(run.id for run in RunStore().list() if run.metrics["semi_structured"].get("speedup")))
    # the kernels' run gone: no column of dashes, the line says why
    at = AppTest.from_file("../app_pages/compare.py", default_timeout=60).run()
    assert "speed-up 2:4 kernels" not in at.dataframe[0].proto.column_order
    assert "2:4 sparse kernels: No CUDA GPU here" in "\n".join(c.value for c in at.caption)
