"""Controls say what they do (issue 21, item 3): N:M fixes the sparsity, so the slider, scope and collapse box
say so; when every layer has its own sparsity the main slider says it has no effect."""
from streamlit.testing.v1 import AppTest

from tests.apptest import live_slider, set_sparsity, texts


def open_prune(**params) -> AppTest:
    at = AppTest.from_file("../app.py", default_timeout=300)
    for key, value in {"model": "mlp", "data": "digits", **params}.items():
        at.query_params[key] = value
    at.switch_page("app_pages/prune.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_nm_says_the_sparsity_is_fixed_and_draws_no_collapse_point():
    at = open_prune(structure="nm", nm="2:4", scope="global")
    slider = live_slider(at)
    assert slider["values"] == [0.5] and slider["disabled"]
    assert slider["label"] == "Sparsity: 50%, fixed by the 2:4 pattern (no slider)"
    assert at.radio(key="prune_scope").disabled
    assert "beyond" not in texts(at.info) and "empties" not in texts(at.info)
    assert "no collapse point" in texts(at.caption)
    plan = at.session_state["prune_plan"]  # 2 of every 4 weights of each row go, in every layer
    assert all(layer.pruned == layer.total // 2 for layer in plan.layers)


def test_when_every_layer_has_its_own_sparsity_the_main_slider_says_it_has_no_effect():
    at = open_prune(structure="unstructured", scope="local")
    assert not live_slider(at)["disabled"]
    at.multiselect(key="prune_protect").set_value(["classifier"]).run()
    at.multiselect(key="prune_override_layers").set_value(["fc1", "fc2"]).run()
    slider = live_slider(at)
    assert slider["disabled"] and "no effect" in slider["label"]
    before = [(layer.name, layer.pruned) for layer in at.session_state["prune_plan"].layers]
    set_sparsity(at, 0.7)
    assert [(layer.name, layer.pruned) for layer in at.session_state["prune_plan"].layers] == before
    assert dict(before) == {"fc1": round(0.5 * 64 * 256), "fc2": round(0.5 * 256 * 128), "classifier": 0}
