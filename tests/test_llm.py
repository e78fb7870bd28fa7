"""Wanda, SparseGPT and N:M against independent computations: brute-force norms, closed forms, exact patterns."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explorer.errors import ExplorerError
from explorer.layers import effective_weight
from explorer.llm import (
    check_nm, hessians, nm_mask, nm_misfits, nm_scores, parse_nm, sparsegpt_prune, sparsegpt_scores,
    wanda_raw, wanda_scores,
)
from explorer.masking import current_masks, masks
from explorer.planner import plan, prepare


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 ``Conv1D`` re-typed: a Linear whose weight is stored (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


class TokenModel(nn.Module):
    """Token ids -> embedding -> two Linears, as a tiny language model would."""

    def __init__(self, vocab=50, width=16, hidden=32, classes=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, classes)

    def forward(self, ids):
        return self.down(torch.relu(self.up(self.embed(ids))))


def correlated_inputs(rows, width, seed=0):
    """Rows driven by a few latent factors, with feature scales spread over e^±2 (outlier features)."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(rows, 16, generator=generator) @ torch.randn(16, width, generator=generator)
    scales = torch.exp(torch.randn(width, generator=generator))
    return (latent + 0.1 * torch.randn(rows, width, generator=generator)) * scales


def lowest_per_row(scores, fraction):
    """Keep-mask pruning the ``fraction`` lowest scores of every row (independent of the planner)."""
    count = round(fraction * scores.shape[1])
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, scores.argsort(dim=1, stable=True)[:, :count], False)
    return keep


def lowest_of_layer(scores, fraction):
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[scores.reshape(-1).argsort(stable=True)[:round(fraction * scores.numel())]] = False
    return keep.reshape(scores.shape)


# --------------------------------------------------------------------------- Wanda


def test_wanda_raw_is_weight_times_input_feature_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    calib = [(torch.randn(3, 5, 6), torch.zeros(3)), (torch.randn(2, 5, 6), torch.zeros(2))]
    raw = wanda_raw(model, calib)["0"]
    rows = [row for x, _ in calib for sequence in x for row in sequence]
    expected = torch.empty(4, 6)
    for j in range(6):
        norm = sum(float(row[j]) ** 2 for row in rows) ** 0.5
        for i in range(4):
            expected[i, j] = abs(float(model[0].weight[i, j].detach())) * norm
    assert torch.allclose(raw, expected, rtol=1e-5)


def test_wanda_raw_of_a_grouped_conv_uses_each_groups_channel_norms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2))
    x = torch.randn(5, 4, 7, 7)
    raw = wanda_raw(model, [x])["0"]
    channel_norms = x.pow(2).sum(dim=(0, 2, 3)).sqrt()
    weight = model[0].weight.detach().abs()
    for out in range(6):
        group = out // 3
        for j in range(2):
            assert torch.allclose(raw[out, j], weight[out, j] * channel_norms[2 * group + j], rtol=1e-5)


def test_wanda_scores_prune_half_of_every_row_in_local_and_global_plans():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 10))
    x = correlated_inputs(256, 32)
    scores = wanda_scores(model, [(x, None)])
    raw = wanda_raw(model, [(x, None)])
    ranking = prepare(scores)
    for scope in ("local", "global"):
        keep = masks(ranking, plan(ranking, 0.5, scope))
        for name, mask in keep.items():
            assert ((~mask).sum(dim=1) == mask.shape[1] // 2).all()
            assert torch.equal(mask, lowest_per_row(raw[name], 0.5))


def test_wanda_runs_on_token_ids_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = TokenModel().train()
    before = copy.deepcopy(model.state_dict())
    ids = torch.randint(0, 50, (4, 12))
    scores = wanda_scores(model, [(ids, None)])
    assert set(scores) == {"up", "down"} and model.training
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    assert not model.up._forward_hooks


def test_a_layer_the_calibration_never_reaches_is_left_out():
    model = TokenModel()
    model.unused = nn.Linear(4, 4)
    ids = torch.randint(0, 50, (2, 6))
    assert set(wanda_raw(model, [ids])) == set(hessians(model, [ids])) == {"up", "down"}


def test_a_model_that_fails_on_its_input_gives_one_message():
    with pytest.raises(ExplorerError, match="failed on a calibration batch"):
        wanda_raw(nn.Sequential(nn.Linear(6, 4)), [(torch.randn(2, 5), None)])


# ----------------------------------------------------------------------------- N:M


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_nm_scores_make_the_planner_cut_an_exact_nm_pattern(n, m):
    torch.manual_seed(0)
    scores = {"a": torch.randn(6, 16).abs(), "b": torch.randn(5, 8, 2, 2).abs()}
    scores["a"][:, :8] = 0.5  # ties: still exact, lower index pruned first
    keyed = nm_scores(scores, n, m)
    ranking = prepare(keyed)
    for scope in ("local", "global"):
        keep = masks(ranking, plan(ranking, (m - n) / m, scope))
        for name, score in scores.items():
            groups = keep[name].reshape(score.shape[0], -1, m)
            assert ((~groups).sum(dim=-1) == m - n).all()
            assert torch.equal(keep[name], nm_mask(score, n, m))
            assert torch.equal(keep[name], expected_nm(score, n, m))


def expected_nm(score, n, m):
    """Brute force: in each group prune the m - n lowest (ties: lower index first)."""
    flat = score.reshape(score.shape[0], -1)
    keep = torch.ones_like(flat, dtype=torch.bool)
    for row in range(flat.shape[0]):
        for start in range(0, flat.shape[1], m):
            group = [(float(flat[row, start + k]), k) for k in range(m)]
            for _, k in sorted(group)[: m - n]:
                keep[row, start + k] = False
    return keep.reshape(score.shape)


def test_nm_on_a_transposed_layer_groups_along_its_first_dimension():
    score = torch.rand(8, 3)
    keep = nm_mask(score, 2, 4, transposed=True)
    assert torch.equal(keep, expected_nm(score.t(), 2, 4).t())


def test_nm_layers_that_do_not_fit_are_named():
    scores = {"ok": torch.rand(4, 8), "odd": torch.rand(4, 6)}
    assert nm_misfits(scores, 4) == ["odd"]
    with pytest.raises(ExplorerError, match="'odd' has 6 inputs.*protect it"):
        nm_scores(scores, 2, 4)


def test_parse_nm_reads_and_validates():
    assert parse_nm("2:4") == (2, 4) and parse_nm(" 4 : 8 ") == (4, 8)
    for text in ("2/4", "two:four", "", "2:4:8"):
        with pytest.raises(ExplorerError, match="must look like '2:4'"):
            parse_nm(text)
    for text in ("4:4", "0:4", "5:4", "2:64"):
        with pytest.raises(ExplorerError, match="1 <= N < M <= 32"):
            parse_nm(text)


def test_check_nm_counts_groups_with_too_many_nonzeros():
    model = nn.Sequential(nn.Linear(8, 2, bias=False), nn.Linear(2, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0, 2, 0, 0, 0, 0, 3], [1, 2, 3, 0, 0, 0, 0, 0]]))
    assert check_nm(model, 2, 4) == {"0": 1}  # the 2-input layer cannot be 2:4 and is left out
    assert check_nm(model, 3, 4) == {"0": 0}


# ------------------------------------------------------------------------ SparseGPT


def test_hessian_is_two_over_n_sum_of_outer_products():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    calib = [torch.randn(2, 4, 5), torch.randn(3, 4, 5)]
    rows = torch.cat([x.reshape(-1, 5) for x in calib]).double()
    expected = 2 / rows.shape[0] * sum(torch.outer(row, row) for row in rows)
    assert torch.allclose(hessians(model, calib)["0"].double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 4, 3, padding=1, stride=2, bias=False),
    nn.Conv2d(3, 4, (2, 3), padding="same", dilation=2, padding_mode="reflect", bias=False),
    nn.Conv1d(3, 4, 4, padding=2, bias=False),
])
def test_conv_hessian_predicts_the_output_error_of_any_weight_change(conv):
    """‖conv(x; W) − conv(x; W + Δ)‖² = N/2 · tr(Δ H Δᵀ) checks the unfolded rows (layout, padding, stride)."""
    torch.manual_seed(0)
    model = nn.Sequential(conv)
    x = torch.randn(2, 3, 9, 8) if isinstance(conv, nn.Conv2d) else torch.randn(2, 3, 11)
    h = hessians(model, [x])["0"].double()
    delta = torch.randn_like(conv.weight) * 0.1
    changed = copy.deepcopy(conv)
    with torch.no_grad():
        changed.weight += delta
    measured = (conv(x) - changed(x)).double().pow(2).sum()
    rows = conv(x).numel() // conv.out_channels
    flat = delta.reshape(4, -1).double()
    assert torch.allclose(measured, rows / 2 * torch.trace(flat @ h @ flat.t()), rtol=1e-4)


def test_sparsegpt_with_white_inputs_is_magnitude_pruning_per_block():
    """H ∝ I: H⁻¹ is diagonal, so OBS updates touch no other weight; the mask is the lowest |w| per block."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 8))
    weight = model[0].weight.detach().clone()
    sparsegpt_prune(model, {"0": torch.eye(256)}, {"0": 0.5}, blocksize=64)
    keep = current_masks(model)["0"]
    expected = torch.cat([lowest_of_layer(weight[:, start:start + 64].abs(), 0.5) for start in range(0, 256, 64)], 1)
    assert torch.equal(keep, expected)
    assert torch.equal(effective_weight(model[0])[keep], weight[keep])
    assert (effective_weight(model[0])[~keep] == 0).all()


def test_sparsegpt_with_a_diagonal_hessian_prunes_dead_inputs_first_and_updates_nothing():
    """Diagonal H: saliency w²·(h_j + λ), dead inputs (h_j = 0) score 0; no cross terms, so no updates."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 5))
    weight = model[0].weight.detach().clone()
    h = torch.rand(12) + 0.5
    h[[2, 7]] = 0
    sparsegpt_prune(model, {"0": torch.diag(h)}, {"0": 0.4})
    damped = torch.where(h == 0, torch.ones(12), h)
    saliency = weight ** 2 * (damped + 0.01 * damped.mean())
    saliency[:, [2, 7]] = 0
    keep = current_masks(model)["0"]
    assert torch.equal(keep, lowest_of_layer(saliency, 0.4)) and not keep[:, [2, 7]].any()
    assert torch.equal(effective_weight(model[0])[keep], weight[keep])


def test_sparsegpt_factor_is_the_references_cholesky_of_the_inverse():
    """U from one flipped factorisation equals cholesky(cholesky_inverse(cholesky(H)), upper=True), dead inputs set to 1."""
    from explorer.llm import _inverse_cholesky
    torch.manual_seed(0)
    rows = torch.randn(300, 40, dtype=torch.float64)
    rows[:, [3, 17]] = 0
    hessian = rows.t() @ rows
    upper, dead = _inverse_cholesky("layer", hessian.float(), 0.01)
    reference = hessian.float().double().clone()
    reference.diagonal()[[3, 17]] = 1.0
    reference.diagonal().add_(0.01 * reference.diagonal().mean())
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(reference)), upper=True)
    assert dead.nonzero().flatten().tolist() == [3, 17]
    assert torch.allclose(upper.double(), expected, rtol=1e-5, atol=1e-7)
    assert torch.allclose(upper.double().t() @ upper.double(), torch.linalg.inv(reference), rtol=1e-4, atol=1e-6)


def test_sparsegpt_on_an_indefinite_hessian_says_what_to_do():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ExplorerError, match="not positive definite"):
        sparsegpt_prune(model, {"0": -torch.eye(4) * 10}, {"0": 0.5})


def test_sparsegpt_nm_weights_do_not_depend_on_the_block_size():
    """Lazy block updates are exact: with N:M (masks chosen column group by column group) any block size agrees."""
    torch.manual_seed(0)
    x = correlated_inputs(512, 64)
    model = nn.Sequential(nn.Linear(64, 16))
    hs = hessians(model, [x])
    results = []
    for blocksize in (4, 24, 128):
        pruned = copy.deepcopy(model)
        sparsegpt_prune(pruned, hs, 0.5, nm=(2, 4), blocksize=blocksize)
        results.append(effective_weight(pruned[0]).detach())
    assert torch.allclose(results[0], results[2], rtol=1e-4, atol=1e-5)
    assert torch.allclose(results[1], results[2], rtol=1e-4, atol=1e-5)


def test_sparsegpt_saliency_with_a_diagonal_hessian_is_w_squared_times_damped_h():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3))
    h = torch.tensor([1.0, 2, 3, 4, 5, 0])  # the last input is dead: it scores 0
    saliency = sparsegpt_scores(model, {"0": torch.diag(h)})["0"]
    damped = h[:5] + 0.01 * torch.tensor([1.0, 2, 3, 4, 5, 1]).mean()
    weight = model[0].weight.detach()
    assert torch.allclose(saliency[:, :5], weight[:, :5] ** 2 * damped, rtol=1e-5)
    assert (saliency[:, 5] == 0).all()


def test_sparsegpt_reconstructs_correlated_inputs_better_than_magnitude_and_wanda():
    torch.manual_seed(0)
    x = correlated_inputs(2048, 128)
    model = nn.Sequential(nn.Linear(128, 64, bias=False))
    weight = model[0].weight.detach().clone()
    calib = [(x[start:start + 512], None) for start in range(0, 2048, 512)]

    def error(pruned_weight):
        return float(torch.linalg.norm(x @ weight.t() - x @ pruned_weight.t()))

    magnitude = error(weight * lowest_of_layer(weight.abs(), 0.5))
    wanda = error(weight * lowest_per_row(wanda_raw(model, calib)["0"], 0.5))
    pruned = copy.deepcopy(model)
    sparsegpt_prune(pruned, hessians(model, calib), {"0": 0.5})
    sparsegpt = error(effective_weight(pruned[0]).detach())
    assert sparsegpt < 0.5 * wanda and wanda < 0.6 * magnitude


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_sparsegpt_prunes_exactly_what_is_asked_on_a_token_model(nm):
    torch.manual_seed(0)
    model = TokenModel(hidden=64)
    ids = torch.randint(0, 50, (8, 16))
    hs = hessians(model, [(ids, None)])
    wanted = {"up": 0.5, "down": 0.5} if nm else {"up": 0.3, "down": 0.75}
    sparsegpt_prune(model, hs, wanted, nm=nm)
    for name, fraction in wanted.items():
        weight = effective_weight(getattr(model, name))
        assert int((~current_masks(model)[name]).sum()) == round(fraction * weight.numel())
        assert int((weight == 0).sum()) == round(fraction * weight.numel())
    if nm:
        assert check_nm(model, *nm) == {"up": 0, "down": 0}
    assert torch.isfinite(model(ids)).all()


def test_sparsegpt_on_a_cnn_prunes_convs_and_leaves_depthwise_convs_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    x = torch.randn(16, 3, 8, 8)
    hs = hessians(model, [(x, None)])
    assert set(hs) == {"0", "4"}
    sparsegpt_prune(model, hs, {"0": 0.5, "4": 0.8})
    assert int((~current_masks(model)["0"]).sum()) == 108 and int((~current_masks(model)["4"]).sum()) == 2304
    with pytest.raises(ExplorerError, match="'2' is a grouped convolution"):
        sparsegpt_prune(model, {"2": torch.eye(9)}, {"2": 0.5})


def test_sparsegpt_keeps_pruned_weights_pruned_on_a_masked_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    x = correlated_inputs(128, 16)
    hs = hessians(model, [x])
    sparsegpt_prune(model, hs, {"0": 0.25})
    first = current_masks(model)["0"]
    sparsegpt_prune(model, hs, {"0": 0.5}, blocksize=4)
    second = current_masks(model)["0"]
    assert not (second & ~first).any() and int((~second).sum()) == 64
    sparsegpt_prune(model, hs, {"0": 0.25}, blocksize=4)  # asks for less than is pruned: nothing revives
    assert torch.equal(current_masks(model)["0"], second)


def test_sparsegpt_on_a_transposed_conv1d_matches_the_same_linear():
    torch.manual_seed(0)
    x = correlated_inputs(256, 16).reshape(8, 32, 16)
    transposed = nn.Sequential(Conv1D(12, 16))
    linear = nn.Sequential(nn.Linear(16, 12))
    with torch.no_grad():
        linear[0].weight.copy_(transposed[0].weight.t())
        linear[0].bias.copy_(transposed[0].bias)
    for model in (transposed, linear):
        sparsegpt_prune(model, hessians(model, [x]), 0.5, nm=(2, 4), blocksize=8)
    assert torch.allclose(effective_weight(transposed[0]).t(), effective_weight(linear[0]), atol=1e-6)
    assert check_nm(transposed, 2, 4) == {"0": 0}
    assert torch.equal(transposed[0].weight_mask.bool(), current_masks(linear)["0"].t())  # zeros kept as a mask
    assert torch.allclose(transposed(x), linear(x), atol=1e-5)
    raw = wanda_raw(transposed, [x])["0"]
    assert torch.allclose(raw, effective_weight(transposed[0]).abs() * x.reshape(-1, 16).norm(dim=0)[:, None])
    ranking = prepare(wanda_scores(transposed, [x]))
    keep = masks(ranking, plan(ranking, 0.75))["0"]  # an output is a column of the stored (in, out) weight
    assert torch.equal(keep, lowest_per_row(raw.t(), 0.75).t()) and ((~keep).sum(dim=0) == 12).all()


def test_sparsegpt_refuses_tied_weights_bad_nm_sparsity_and_missing_hessians():
    model = TokenModel(vocab=16, width=16, hidden=16, classes=16)
    model.down.weight = model.embed.weight
    hs = {"up": torch.eye(16), "down": torch.eye(16)}
    with pytest.raises(ExplorerError, match="'down' shares its weight with embed.weight \\("):
        sparsegpt_prune(model, hs, {"down": 0.5})
    with pytest.raises(ExplorerError, match="2:4 prunes exactly 50%"):
        sparsegpt_prune(model, hs, {"up": 0.3}, nm=(2, 4))
    with pytest.raises(ExplorerError, match="No Hessian for layer 'up'"):
        sparsegpt_prune(model, {}, {"up": 0.5})


def test_a_tiny_gpt2_from_transformers_prunes_to_2_4():
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 100, (4, 16))
    hs = hessians(model, [(ids, None)])
    blocks = [name for name in hs if name != "lm_head"]
    assert len(blocks) == 8 and all(".c_" in name for name in blocks)  # GPT-2's Conv1D layers are found
    assert set(wanda_scores(model, [(ids, None)])) == set(hs)
    with pytest.raises(ExplorerError, match="'lm_head' shares its weight with transformer.wte.weight"):
        sparsegpt_prune(model, hs, {"lm_head": 0.5})
    sparsegpt_prune(model, hs, {name: 0.5 for name in blocks}, nm=(2, 4))
    assert set(check_nm(model, 2, 4, layers=blocks).values()) == {0}
    assert torch.isfinite(model(ids).logits).all()
