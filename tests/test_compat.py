"""The compatibility report before any cut: per structure what is prunable, what is left out and why, head steps,
scoring cost; a structure the model cannot serve refused in one line before any scoring."""
import json

import pytest
import torch
from streamlit.testing.v1 import AppTest
from torch import nn

from explorer import cli, compat, criteria, pipeline, zoo
from explorer.errors import ExplorerError
from explorer.specs import ScoringSpec
from tests.test_app_numbers import _untrained_entry


class Shuffle(nn.Module):
    """ShuffleNet's channel shuffle and split: torch-pruning fails tracing it (ZeroDivisionError), as on shufflenet_v2."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c, self.fc = nn.Conv2d(8, 4, 1), nn.Linear(4, 2)

    def forward(self, x):
        x = self.a(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        left, right = x.chunk(2, dim=1)
        x = torch.cat([left, self.b(torch.cat([right, right], 1))[:, :4]], 1)
        return self.fc(self.c(x).mean((2, 3)))


class Seven(nn.Module):
    """One attention of 7 heads over 28 features: a head is 1/7 of it."""

    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(28, 7, batch_first=True)
        self.fc = nn.Linear(28, 3)

    def forward(self, x):
        return self.fc(self.attention(x, x, x)[0].mean(1))


def test_the_vit_report_names_every_structure_what_it_leaves_out_and_the_head_steps():
    model = zoo.build("vit_small", (3, 16, 16), 4).eval()
    result = compat.report(model, torch.randn(1, 3, 16, 16), calib_batches=2, calib_batch_size=4)
    structures = result["structures"]
    assert all(structures[name]["ok"] for name in ("unstructured", "nm", "channel", "head"))
    kinds = {unit["name"]: unit["kind"] for unit in structures["unstructured"]["units"]}
    assert kinds["encoder.layers.0.self_attn"] == "MultiheadAttention in_proj" and len(kinds) == 10
    residual = next(left for left in structures["channel"]["left_out"] if left["name"] == "patch_embed")
    assert "MultiheadAttention" in residual["reason"] and "--structure head" in residual["reason"]
    assert [u["name"] for u in structures["channel"]["units"]] == ["encoder.layers.0.linear1", "encoder.layers.1.linear1"]
    assert result["constraints"] == [f"encoder.layers.{i}.self_attn: 4 heads of 16: 1/4 steps (25% of the attention "
                                     "a head)" for i in range(2)]
    costs = result["scoring"]["criteria"]
    assert costs["magnitude"]["forward_passes"] == 0 and costs["wanda"]["forward_passes"] == 2
    assert costs["taylor"]["forward_passes"] == 6  # forward + backward (two forwards) per batch
    assert costs["conductance"]["forward_passes"] == 2 * 3 * (criteria.CONDUCTANCE_STEPS + 1)
    assert costs["taylor"]["seconds"] == pytest.approx(6 * result["scoring"]["forward_seconds"])
    lines = compat.summary_lines(result)
    assert any(line.startswith("  left out patch_embed: it runs through nn.MultiheadAttention") for line in lines)


def test_heads_in_sevens_say_one_seventh_steps():
    result = compat.report(Seven().eval(), torch.randn(1, 5, 28), calib_batches=1, calib_batch_size=2)
    assert result["constraints"] == ["attention: 7 heads of 4: 1/7 steps (14% of the attention a head)"]


def test_a_model_torch_pruning_cannot_trace_is_named_with_the_reason_before_any_work():
    result = compat.report(Shuffle().eval(), torch.randn(1, 3, 8, 8), calib_batches=1, calib_batch_size=2)
    channel = result["structures"]["channel"]
    assert not channel["ok"] and "ZeroDivisionError" in channel["reason"] and "\n" not in channel["reason"]
    assert not result["structures"]["head"]["ok"]
    assert result["structures"]["unstructured"]["ok"] and result["structures"]["nm"]["ok"]


def test_a_structure_the_model_cannot_serve_is_refused_in_one_line_before_scoring(monkeypatch):
    def no_scoring(*args, **kwargs):
        raise AssertionError("scoring started before the refusal")

    monkeypatch.setattr(criteria, "channel_scores", no_scoring)
    monkeypatch.setattr(criteria, "weight_scores", no_scoring)
    mlp = zoo.build("mlp", (1, 8, 8), 10).eval()
    with pytest.raises(ExplorerError, match=r"^This model has no attention heads.*--structure channel"):
        pipeline.prepare(mlp, ScoringSpec("head", "magnitude"), example_input=torch.randn(1, 1, 8, 8))
    odd = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(ExplorerError, match="multiples of 4, so no N:M pattern fits"):
        pipeline.prepare(odd, ScoringSpec("nm", "magnitude"), example_input=torch.randn(1, 3))
    with pytest.raises(ExplorerError, match="no Conv1d, Conv2d, Linear or nn.MultiheadAttention"):
        pipeline.prepare(nn.Sequential(nn.ReLU()), ScoringSpec("unstructured"), example_input=torch.randn(1, 3))
    assert compat.refusal(mlp, "unstructured") is None and compat.refusal(odd, "nm", (2, 5)) is None


def test_gpt2s_fused_attention_is_refused_for_heads_in_its_own_words():
    transformers = pytest.importorskip("transformers")
    from explorer import hf

    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=8)
    gpt2 = hf.TokenModel(transformers.GPT2Model(config), "embedding", pad_id=0)  # Conv1D projections as Linear
    assert "fused projection" in compat.refusal(gpt2, "head")
    assert compat.refusal(gpt2, "unstructured") is None


def test_cli_inspect_compat_prints_the_report(capsys):
    assert cli.main(["inspect", "--model", "vit_small", "--compat", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["compat"]["structures"]["head"]["ok"]
    assert result["compat"]["constraints"][0].startswith("encoder.layers.0.self_attn: 4 heads of 16")
    assert cli.main(["inspect", "--model", "vit_small", "--compat"]) == 0
    text = capsys.readouterr().out
    assert "compatibility:" in text and "left out patch_embed: it runs through nn.MultiheadAttention" in text


def test_the_model_page_check_shows_the_report_of_the_loaded_model():
    at = AppTest.from_file("../app.py", default_timeout=240)
    at.session_state["current_model"] = _untrained_entry("vit_small")
    at.switch_page("app_pages/model.py").run()
    assert not at.exception, [e.value for e in at.exception]
    at.button(key="model_compat").click().run()
    assert not at.exception and not at.error, [e.value for e in at.exception]
    table = next(d.value for d in at.dataframe if list(d.value.columns)[:2] == ["structure", "ok"])
    assert table.set_index("structure")["ok"].to_dict() == {"unstructured": True, "nm": True, "channel": True,
                                                           "head": True}
    assert table.set_index("structure").loc["channel", "left out"] == 2
    captions = [c.value for c in at.caption]
    assert "Heads: encoder.layers.0.self_attn: 4 heads of 16: 1/4 steps (25% of the attention a head)" in captions
