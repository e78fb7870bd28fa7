"""Every criterion on a small conv + BN + linear model, against independent computations."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explorer.layers import prunable_layers
from explorer.criteria import (
    CRITERIA,
    batchnorm_after,
    channel_scores,
    weight_scores,
)
from explorer.errors import ExplorerError

LAYERS = ["0", "3", "7"]


def small_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )
    with torch.no_grad():
        model[1].weight.uniform_(-2, 2)
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2)
    return model


def calib_batches(count=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, 8, 8, generator=generator), torch.randint(0, 5, (6,), generator=generator)) for _ in range(count)]


def manual_grads(model, batches):
    """Per-batch weight gradients of the eval-mode model, by plain loss.backward()."""
    model = copy.deepcopy(model).eval()
    per_batch = []
    for inputs, labels in batches:
        model.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        per_batch.append({name: module.weight.grad.clone() for name, module in prunable_layers(model)})
    return per_batch


def weights(model):
    return {name: module.weight.detach() for name, module in prunable_layers(model)}


def test_prunable_layers_and_registry():
    assert [name for name, _ in prunable_layers(small_model())] == LAYERS
    assert set(CRITERIA) == {"magnitude", "random", "gradient", "taylor", "bn_scale", "conductance", "snip", "synflow",
                             "wanda", "sparsegpt"}
    for name, criterion in CRITERIA.items():
        assert criterion.name == name and criterion.description and isinstance(criterion.needs_data, bool)
    assert [name for name, c in CRITERIA.items() if c.needs_data] == ["gradient", "taylor", "conductance", "snip",
                                                                                "wanda", "sparsegpt"]


@pytest.mark.parametrize("name", list(CRITERIA))
def test_every_criterion_shapes_and_leaves_model_untouched(name):
    model = small_model().train()
    before = copy.deepcopy(model.state_dict())
    calib = calib_batches(1)
    by_weight = weight_scores(model, name, calib)
    by_channel = channel_scores(model, name, calib) if name != "sparsegpt" else {}  # sparsegpt: weights only
    for layer, module in prunable_layers(model):
        assert by_weight[layer].shape == module.weight.shape
        by_channel.setdefault(layer, torch.zeros(module.weight.shape[0]))
        assert by_channel[layer].shape == (module.weight.shape[0],)
        assert by_weight[layer].dtype == torch.float32 and torch.isfinite(by_weight[layer]).all()
        assert (by_weight[layer] >= 0).all() and (by_channel[layer] >= 0).all()
        assert module.weight.grad is None and module.weight.requires_grad
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_magnitude():
    model = small_model()
    by_weight = weight_scores(model, "magnitude")
    l1 = channel_scores(model, "magnitude")
    l2 = channel_scores(model, "magnitude", norm="l2")
    for name, weight in weights(model).items():
        assert torch.equal(by_weight[name], weight.abs())
        rows = weight.reshape(weight.shape[0], -1)
        assert torch.allclose(l1[name], rows.abs().sum(1))
        assert torch.allclose(l2[name], (rows**2).sum(1).sqrt())


def test_random_is_seeded():
    model = small_model()
    first = weight_scores(model, "random", seed=3)
    assert all(torch.equal(first[n], weight_scores(model, "random", seed=3)[n]) for n in LAYERS)
    assert not torch.equal(first["0"], weight_scores(model, "random", seed=4)["0"])
    assert torch.equal(channel_scores(model, "random", seed=1)["3"], channel_scores(model, "random", seed=1)["3"])


def test_gradient_and_taylor_against_manual_backward():
    model, calib = small_model(), calib_batches(3)
    grads = manual_grads(model, calib)
    gradient = weight_scores(model, "gradient", calib)
    gradient_channels = channel_scores(model, "gradient", calib, norm="l2")
    taylor = weight_scores(model, "taylor", calib)
    taylor_channels = channel_scores(model, "taylor", calib)
    for name, weight in weights(model).items():
        expected_gradient = sum(g[name].abs() for g in grads)
        assert torch.allclose(gradient[name], expected_gradient, atol=1e-6)
        assert torch.allclose(gradient_channels[name], expected_gradient.flatten(1).norm(dim=1), atol=1e-6)
        assert torch.allclose(taylor[name], sum((weight * g[name]).abs() for g in grads), atol=1e-6)
        expected_channels = sum((weight * g[name]).flatten(1).sum(1).abs() for g in grads)
        assert torch.allclose(taylor_channels[name], expected_channels, atol=1e-6)


def test_max_batches_limits_calibration():
    model, calib = small_model(), calib_batches(3)
    limited = weight_scores(model, "gradient", calib, max_batches=1)
    single = weight_scores(model, "gradient", calib[:1])
    assert all(torch.equal(limited[n], single[n]) for n in LAYERS)


def test_snip_on_one_batch():
    model, calib = small_model(), calib_batches(1)
    (grads,) = manual_grads(model, calib)
    snip = weight_scores(model, "snip", calib)
    snip_channels = channel_scores(model, "snip", calib)
    for name, weight in weights(model).items():
        assert torch.allclose(snip[name], (weight * grads[name]).abs(), atol=1e-7)
        assert torch.allclose(snip_channels[name], (weight * grads[name]).abs().flatten(1).sum(1), atol=1e-6)


def test_bn_scale_uses_following_batchnorm_and_falls_back_to_l1():
    model = small_model()
    assert batchnorm_after(model) == {"0": "1"}
    channels = channel_scores(model, "bn_scale")
    assert torch.equal(channels["0"], model[1].weight.detach().abs())
    assert torch.allclose(channels["3"], model[3].weight.detach().abs().flatten(1).sum(1))
    by_weight = weight_scores(model, "bn_scale")
    assert torch.equal(by_weight["0"][:, 1, 2, 0], channels["0"])
    assert (by_weight["0"] == channels["0"].reshape(-1, 1, 1, 1)).all()


class Untraceable(nn.Module):
    """Data-dependent control flow defeats torch.fx: pairs come from module order."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.norm(self.conv(x))
        if x.sum() > 0:
            x = x * 2
        return self.head(x.mean(dim=(2, 3)))


def test_bn_pairs_fall_back_to_module_order():
    assert batchnorm_after(Untraceable()) == {"conv": "norm"}


def test_conductance_of_logit_layer_is_logit_change():
    """For the output layer, conductance of neuron c towards target c is logit_c(x) − logit_c(0)."""
    model, calib = small_model(), calib_batches(2)
    scores = channel_scores(model, "conductance", calib)
    eval_model = copy.deepcopy(model).eval()
    expected = torch.zeros(5)
    count = 0
    with torch.no_grad():
        for inputs, labels in calib:
            change = eval_model(inputs) - eval_model(torch.zeros_like(inputs))
            for row, label in enumerate(labels.tolist()):
                expected[label] += change[row, label].abs()
            count += len(labels)
    assert torch.allclose(scores["7"], expected / count, atol=1e-4)
    by_weight = weight_scores(model, "conductance", calib)
    assert torch.allclose(by_weight["7"][:, 0], scores["7"])


def test_synflow_matches_closed_form_and_is_data_free():
    """Two linear layers: R = 1ᵀ|W2|(|W1|1 + |b1|) + Σ|b2|, so the scores have a closed form."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    scores = weight_scores(model, "synflow", input_shape=(4,))
    w1, b1, w2 = (p.detach().double().abs() for p in (model[0].weight, model[0].bias, model[2].weight))
    expected_first = w1 * w2.sum(0).unsqueeze(1)
    expected_second = w2 * (w1.sum(1) + b1).unsqueeze(0)
    ratio = scores["0"].double().max() / expected_first.max()
    assert torch.allclose(scores["0"].double(), expected_first * ratio, rtol=1e-5)
    assert torch.allclose(scores["2"].double(), expected_second * ratio, rtol=1e-5)
    assert torch.allclose(channel_scores(model, "synflow", input_shape=(4,))["2"], scores["2"].sum(1))


def test_synflow_on_conv_model_needs_only_the_shape():
    model = small_model()
    free = weight_scores(model, "synflow", input_shape=(3, 8, 8))
    from_calib = weight_scores(model, "synflow", calib_batches(1))
    for name in LAYERS:
        assert torch.equal(free[name], from_calib[name])
        assert (free[name] > 0).all()
    with pytest.raises(ExplorerError, match="input_shape"):
        weight_scores(model, "synflow")
    with pytest.raises(ExplorerError, match="all-ones"):
        weight_scores(model, "synflow", input_shape=(5, 8))


def test_errors():
    model = small_model()
    with pytest.raises(ExplorerError, match="Unknown criterion"):
        weight_scores(model, "l0-norm")
    for name in ("gradient", "taylor", "snip", "conductance"):
        with pytest.raises(ExplorerError, match="calibration"):
            channel_scores(model, name)
    with pytest.raises(ExplorerError, match="empty"):
        weight_scores(model, "gradient", [])
    with pytest.raises(ExplorerError, match="pairs"):
        weight_scores(model, "gradient", [torch.randn(2, 3, 8, 8)])
    with pytest.raises(ExplorerError, match="no Conv1d"):
        weight_scores(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), "magnitude")
    with pytest.raises(ExplorerError, match="norm"):
        channel_scores(model, "magnitude", norm="l3")
    with pytest.raises(ExplorerError, match="max_batches"):
        weight_scores(model, "gradient", calib_batches(1), max_batches=0)
    broken = small_model()
    with torch.no_grad():
        broken[3].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ExplorerError, match="NaN"):
        weight_scores(broken, "magnitude")
    with pytest.raises(ExplorerError, match="NaN"):
        channel_scores(broken, "taylor", calib_batches(1))


def test_conv1d_and_linear_on_sequences():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6, 4))
    calib = [(torch.randn(5, 2, 8), torch.randint(0, 4, (5,)))]
    for name in CRITERIA:
        if name == "sparsegpt":  # single weights only: it rebuilds the kept ones
            with pytest.raises(ExplorerError, match="unstructured or nm"):
                channel_scores(model, name, calib)
            continue
        scores = channel_scores(model, name, calib)
        assert scores["0"].shape == (3,) and scores["3"].shape == (4,)


@pytest.mark.parametrize("name", list(CRITERIA))
def test_criteria_on_a_masked_model_score_the_effective_weights(name):
    from explorer.masking import apply
    from explorer.planner import plan, prepare

    model = small_model()
    ranking = prepare(weight_scores(model, "magnitude"))
    masked = apply(model, plan(ranking, 0.5, "local"), ranking)
    masked(calib_batches(1)[0][0])  # a forward makes .weight a non-leaf tensor
    scores = weight_scores(masked, name, calib_batches(1), input_shape=(3, 8, 8))
    assert scores["0"].shape == (6, 3, 3, 3)
    if name in ("magnitude", "taylor", "snip", "synflow"):
        assert (scores["0"][masked[0].weight_mask == 0] == 0).all()


@pytest.mark.parametrize("name", ["gradient", "taylor", "snip"])
def test_one_forward_per_calibration_batch(name):
    model = small_model()
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(1))  # travels with deepcopy
    weight_scores(model, name, calib_batches(3))
    assert len(calls) == 3
    calls.clear()
    channel_scores(model, name, calib_batches(3), max_batches=2)
    assert len(calls) == 2


def test_dataloader_and_generator_calibration():
    model = small_model()
    inputs = torch.randn(12, 3, 8, 8)
    labels = torch.randint(0, 5, (12,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, labels), batch_size=6)
    from_loader = weight_scores(model, "taylor", loader)
    from_generator = weight_scores(model, "taylor", ((inputs[i : i + 6], labels[i : i + 6]) for i in (0, 6)))
    assert all(torch.allclose(from_loader[n], from_generator[n]) for n in LAYERS)


def captum_conductance(model, layer_names, batches):
    """The reference: captum's LayerConductance, one layer at a time, reduced as channel_scores does."""
    from captum.attr import LayerConductance

    model = copy.deepcopy(model).eval()
    modules = dict(model.named_modules())
    expected = {}
    for name in layer_names:
        total, count = 0, 0
        for inputs, labels in batches:
            attribution = LayerConductance(model, modules[name]).attribute(inputs, target=labels, n_steps=16)
            channel_dim = attribution.dim() - 1 if isinstance(modules[name], nn.Linear) else 1
            per_example = attribution.detach().abs().movedim(channel_dim, -1)
            total = total + per_example.reshape(len(inputs), -1, per_example.shape[-1]).mean(1).sum(0)
            count += len(inputs)
        expected[name] = total / count
    return expected


def output_floats_per_example(model, example):
    sizes = []
    hooks = [module.register_forward_hook(lambda m, i, o: sizes.append(o[0].numel())) for _, module in prunable_layers(model)]
    model.eval()(example[:1])
    for hook in hooks:
        hook.remove()
    return sum(sizes)


@pytest.mark.parametrize("rows_per_pass", [None, 1, 6 * 4, 6 * 17 + 1])
@pytest.mark.parametrize("inplace", [False, True])
def test_conductance_matches_captum_layer_by_layer(monkeypatch, rows_per_pass, inplace):
    """All layers in one pass per path chunk equal captum's per-layer LayerConductance.

    ``rows_per_pass`` forces the memory chunking: one example and one path point per pass,
    the whole batch with 4 of the 17 path points, or everything at once (None: the default).
    """
    model, calib = small_model(), calib_batches(2)
    if inplace:
        model[2].inplace = model[4].inplace = True
    if rows_per_pass is not None:
        import explorer.criteria as criteria_module

        floats = output_floats_per_example(copy.deepcopy(model), calib[0][0])
        monkeypatch.setattr(criteria_module, "CONDUCTANCE_FLOATS", floats * rows_per_pass)
    scores = channel_scores(model, "conductance", calib)
    expected = captum_conductance(model, LAYERS, calib)
    for name in LAYERS:
        assert torch.allclose(scores[name], expected[name], rtol=1e-5, atol=1e-8), name


def test_conductance_on_a_linear_over_sequences_matches_captum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))
    calib = [(torch.randn(5, 2, 8), torch.randint(0, 4, (5,)))]
    scores = channel_scores(model, "conductance", calib)
    expected = captum_conductance(model, ["0", "2", "5"], calib)
    for name in ("0", "2", "5"):
        assert scores[name].shape == expected[name].shape
        assert torch.allclose(scores[name], expected[name], rtol=1e-5, atol=1e-8), name


def test_conductance_runs_every_layer_in_the_same_passes():
    """17 path points of 6 examples fit one pass: one forward per calibration batch, whatever the layer count."""
    model = small_model()
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    channel_scores(model, "conductance", calib_batches(2))
    assert calls[0] == 1  # the one-example probe that sizes the chunks
    assert calls[1:] == [6 * 17, 6 * 17]


def test_synflow_linearises_saturating_activations_and_batchnorm():
    """Linear → BN → ReLU6 → Linear, with a BN mean that plain abs() would subtract below zero.

    SynFlow sees BN folded into x·|γ/σ| + |β − γμ/σ| and ReLU6 as ReLU, so with a = that
    affine map of |W1|·1: score(W1) = |W1| · (1ᵀ|W2|)ⱼ · sⱼ and score(W2) = |W2| · aⱼ.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU6(), nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight.mul_(10)
        model[1].weight.uniform_(-2, 2)
        model[1].bias.uniform_(-1, 1)
        model[1].running_mean.fill_(50.0)
        model[1].running_var.uniform_(0.5, 2)
    scores = weight_scores(model, "synflow", input_shape=(4,))
    w1, w2 = (layer.weight.detach().double() for layer in (model[0], model[3]))
    norm = model[1]
    gamma, beta, mean, var = (t.detach().double() for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var))
    scale = gamma / torch.sqrt(var + norm.eps)
    shift = beta - mean * scale
    signal = scale.abs() * w1.abs().sum(1) + shift.abs()
    assert (signal > 6).any()  # ReLU6 would have saturated here
    expected_first = w1.abs() * (w2.abs().sum(0) * scale.abs()).unsqueeze(1)
    expected_second = w2.abs() * signal.unsqueeze(0)
    ratio = scores["0"].double().max() / expected_first.max()
    assert torch.allclose(scores["0"].double(), expected_first * ratio, rtol=1e-5)
    assert torch.allclose(scores["3"].double(), expected_second * ratio, rtol=1e-5)


def test_synflow_scores_every_layer_of_mobilenetv2():
    """ReLU6 used to zero 26 of 27 layers; now none is empty, and global 50 % keeps every layer alive."""
    from explorer.planner import plan, prepare
    from explorer.zoo import build

    torch.manual_seed(0)
    model = build("mobilenetv2_small", (3, 32, 32), 8)
    scores = weight_scores(model, "synflow", input_shape=(3, 32, 32))
    assert len(scores) == 27
    for name, score in scores.items():
        assert score.max() > 0, name
    global_plan = plan(prepare(scores), 0.5, "global")
    assert global_plan.collapsed == []
    assert all(layer.kept > 0 for layer in global_plan.layers)


def assert_progress(calls):
    fractions = [fraction for fraction, _ in calls]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert fractions == sorted(fractions)
    assert all(isinstance(text, str) and text for _, text in calls)


@pytest.mark.parametrize("name", list(CRITERIA))
def test_progress_is_reported_from_zero_to_one(name):
    model = small_model()
    for score_fn in (weight_scores, channel_scores):
        if name == "sparsegpt" and score_fn is channel_scores:
            continue  # no channel form
        calls = []
        score_fn(model, name, calib_batches(3), input_shape=(3, 8, 8), progress=lambda f, t: calls.append((f, t)))
        assert_progress(calls)
        if CRITERIA[name].needs_data:
            fractions = [fraction for fraction, _ in calls]
            assert pytest.approx(1 / 3) in fractions and pytest.approx(2 / 3) in fractions


def test_progress_of_chunked_conductance_and_of_a_generator(monkeypatch):
    import explorer.criteria as criteria_module

    model = small_model()
    monkeypatch.setattr(criteria_module, "CONDUCTANCE_FLOATS", 1)  # one example, one path point per pass
    calls = []
    channel_scores(model, "conductance", calib_batches(2), progress=lambda f, t: calls.append((f, t)))
    assert_progress(calls)
    assert len(calls) == 2 + 2 * 6 * 17
    calls = []
    weight_scores(model, "gradient", (batch for batch in calib_batches(3)), progress=lambda f, t: calls.append((f, t)))
    assert_progress(calls)
    assert len(calls) == 2 + 3
    with pytest.raises(ExplorerError, match="progress"):
        weight_scores(model, "magnitude", progress="bar")


def test_conductance_refuses_a_layer_run_twice():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 2))
    with pytest.raises(ExplorerError, match="more than once"):
        channel_scores(model, "conductance", [(torch.randn(3, 4), torch.tensor([0, 1, 0]))])
