import pytest
import torch
from torch import nn

from explorer.errors import ExplorerError
from explorer.layers import clone_model
from explorer.models import ZOO, build, load_model, read_saved_metadata, save_model

SHAPES = {3: (3, 32, 32), 2: (1, 40), None: (1, 8, 8)}


def factory_model(input_shape=(1, 8, 8), num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), num_classes))


def factory_not_a_module():
    return "not a model"


class Pickled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_models_build_for_their_input_and_run(name):
    shape = SHAPES[ZOO[name].input_rank]
    model = build(name, shape, 7)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7)
    out.sum().backward()
    assert ZOO[name].description


def test_zoo_rejects_wrong_input_rank():
    with pytest.raises(ExplorerError, match="takes images"):
        build("resnet20", (1, 40), 10)
    with pytest.raises(ExplorerError, match="Unknown zoo model"):
        build("alexnet", (3, 32, 32), 10)


def test_zoo_name_and_state_dict_round_trip(tmp_path):
    model = build("lenet5", (1, 8, 8), 10)
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, arch="lenet5", input_shape=(1, 8, 8), num_classes=10)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))
    again = load_model("lenet5", weights=path, input_shape=(1, 8, 8), num_classes=10)
    assert torch.equal(again(x), model(x))


def test_state_dict_without_architecture_asks_for_one(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(build("mlp", (1, 8, 8), 10).state_dict(), path)
    with pytest.raises(ExplorerError, match="choose the architecture"):
        load_model(path)


def test_state_dict_that_does_not_fit_says_so(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(build("mlp", (1, 8, 8), 10).state_dict(), path)
    with pytest.raises(ExplorerError, match="do not fit"):
        load_model(path, arch="mlp", input_shape=(1, 8, 8), num_classes=5)
    with pytest.raises(ExplorerError, match="do not fit"):
        load_model(path, arch="lenet5", input_shape=(1, 8, 8), num_classes=10)


def test_safetensors_state_dict(tmp_path):
    from safetensors.torch import save_file
    model = build("mlp", (1, 8, 8), 10)
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(path))
    loaded = load_model(path, arch="mlp", input_shape=(1, 8, 8), num_classes=10)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))


def test_torchscript_file(tmp_path):
    model = build("mlp", (1, 8, 8), 10).eval()
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    loaded = load_model(path)
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(loaded(x), model(x))


def test_torch_export_program(tmp_path):
    model = build("mlp", (1, 8, 8), 10).eval()
    x = torch.randn(2, 1, 8, 8)
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    loaded = load_model(path)
    assert torch.allclose(loaded(x), model(x))


def test_python_factory_with_and_without_weights(tmp_path):
    spec = "tests.test_models:factory_model"
    model = load_model(spec, input_shape=(1, 8, 8), num_classes=3)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    again = load_model(spec, weights=path, input_shape=(1, 8, 8), num_classes=3)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(again(x), model(x))


def test_factory_errors():
    with pytest.raises(ExplorerError, match="not a torch.nn.Module"):
        load_model("tests.test_models:factory_not_a_module")
    with pytest.raises(ExplorerError, match="Cannot import"):
        load_model("no_such_package.mod:fn")
    with pytest.raises(ExplorerError, match="has no attribute"):
        load_model("tests.test_models:missing")


def test_pickled_module_refused_unless_trusted(tmp_path):
    path = tmp_path / "pickled.pt"
    model = Pickled()
    torch.save(model, path)
    with pytest.raises(ExplorerError, match="pickled model"):
        load_model(path)
    loaded = load_model(path, trust_pickle=True)
    x = torch.randn(2, 4)
    assert torch.equal(loaded(x), model(x))


def test_missing_empty_truncated_and_garbage_files(tmp_path):
    with pytest.raises(ExplorerError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ExplorerError, match="empty"):
        load_model(empty)
    good = tmp_path / "good.pt"
    torch.save(build("mlp", (1, 8, 8), 10).state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ExplorerError, match="truncated or corrupt"):
        load_model(truncated, arch="mlp", input_shape=(1, 8, 8), num_classes=10)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 this is not a model")
    with pytest.raises(ExplorerError):
        load_model(garbage, arch="mlp", input_shape=(1, 8, 8), num_classes=10)
    ts = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(build("mlp", (1, 8, 8), 10)), str(ts))
    cut = tmp_path / "ts_cut.pt"
    cut.write_bytes(ts.read_bytes()[:-200])
    with pytest.raises(ExplorerError):
        load_model(cut)


def test_save_model_round_trips_a_channel_pruned_model(tmp_path):
    """A model whose layers lost channels is rebuilt from its zoo name and reshaped."""
    model = build("mlp", (1, 8, 8), 10)
    keep = torch.arange(0, 256, 2)
    fc1, fc2 = model.fc1, model.fc2
    new_fc1 = nn.Linear(64, len(keep))
    new_fc1.weight.data, new_fc1.bias.data = fc1.weight.data[keep].clone(), fc1.bias.data[keep].clone()
    new_fc2 = nn.Linear(len(keep), 128)
    new_fc2.weight.data, new_fc2.bias.data = fc2.weight.data[:, keep].clone(), fc2.bias.data.clone()
    model.fc1, model.fc2 = new_fc1, new_fc2
    path = save_model(model, tmp_path / "pruned.pt", arch="mlp", input_shape=(1, 8, 8), num_classes=10,
                      metadata={"sparsity": 0.5})
    loaded = load_model(path)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))
    assert loaded.fc1.out_features == 128
    assert read_saved_metadata(path)["metadata"] == {"sparsity": 0.5}


def test_clone_model_copies_masked_models_without_touching_the_original():
    import torch.nn.utils.prune as prune
    model = build("lenet5", (1, 8, 8), 10)
    prune.l1_unstructured(model.features.conv1, "weight", amount=0.5)
    model(torch.randn(1, 1, 8, 8))
    copy = clone_model(model)
    with torch.no_grad():
        copy.features.conv1.weight_orig.mul_(0)
    assert model.features.conv1.weight_orig.abs().sum() > 0
    assert int((copy.features.conv1.weight_mask == 0).sum()) == 75


def test_garbage_is_called_corrupt_not_pickled(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00\x01 this is not a model at all")
    with pytest.raises(ExplorerError) as info:
        load_model(junk)
    assert "pickled" not in str(info.value) and "corrupt" in str(info.value)
