"""State in the URL: a reload, a bookmark or a shared link reopens the same model and Prune settings."""
import pytest
from streamlit.testing.v1 import AppTest

from explorer.recipe import Recipe
from explorer.specs import ModelSpec, PlanSpec, ScoringSpec
from explorer.store import Run, RunStore
from tests.apptest import live_cards, set_sparsity, shown_sparsity


def open_page(page: str, **params) -> AppTest:
    """A new browser session (as after a reload) opened straight on ``page`` with a link's parameters."""
    at = AppTest.from_file("../app.py", default_timeout=120)
    for key, value in params.items():
        at.query_params[key] = value
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_a_page_opened_without_a_model_loads_the_default_instead_of_a_dead_end():
    at = open_page("app_pages/prune.py")
    assert at.session_state["current_model"]["label"] == "mlp"
    assert not at.error and shown_sparsity(at) == 0.5


def test_the_prune_settings_travel_in_the_url_and_come_back_after_a_reload():
    at = open_page("app_pages/prune.py")
    set_sparsity(at, 0.73)
    at.radio(key="prune_scope").set_value("local").run()
    params = dict(at.query_params)
    assert params["model"] == "mlp" and params["data"] == "digits"
    assert params["sparsity"] == "0.73" and params["scope"] == "local"

    reloaded = open_page("app_pages/prune.py", **params)
    assert shown_sparsity(reloaded) == pytest.approx(0.73)
    assert reloaded.radio(key="prune_scope").value == "local"
    units = 64 * 256 + 256 * 128 + 128 * 10
    metrics = live_cards(reloaded)
    assert metrics["Units pruned"].startswith(f"{round(0.73 * 16384) + round(0.73 * 32768) + round(0.73 * 1280):,}")
    assert metrics["Units pruned"].endswith(f"/ {units:,}")


def test_a_link_to_another_zoo_model_opens_it_with_its_settings():
    at = open_page("app_pages/prune.py", model="lenet5", data="digits", structure="channel", criterion="magnitude",
                   scope="global", sparsity="0.3")
    assert at.session_state["current_model"]["label"] == "lenet5"
    assert at.radio(key="prune_structure").value == "channel"
    assert shown_sparsity(at) == pytest.approx(0.3)


def test_a_link_to_a_stored_run_reopens_its_model_and_recipe():
    recipe = Recipe(model=ModelSpec(source="mlp", data="digits"), scoring=ScoringSpec("unstructured", "random"),
                    plan=PlanSpec(sparsity=0.42, scope="local"))
    run = RunStore().save(Run.from_recipe(recipe, model_name="mlp", dataset="digits"))
    at = open_page("app_pages/prune.py", run=str(run.id))
    assert at.selectbox(key="prune_criterion").value == "random"
    assert shown_sparsity(at) == pytest.approx(0.42)
    assert at.radio(key="prune_scope").value == "local"


@pytest.mark.parametrize("params", [{"model": "resnet999"}, {"model": "mlp", "data": "digits", "sparsity": "lots",
                                                               "structure": "blocks"}, {"run": "987654"}])
def test_a_bad_link_falls_back_without_an_error(params):
    at = open_page("app_pages/prune.py", **params)
    assert at.session_state["current_model"]["label"] == "mlp"
    assert shown_sparsity(at) == 0.5 and at.radio(key="prune_structure").value == "unstructured"
    assert not at.error


def test_a_link_reopens_a_transformer_with_its_nm_settings():
    at = open_page("app_pages/prune.py", model="tiny_bert", data="text", structure="nm", nm="4:8", criterion="magnitude")
    model = at.session_state["current_model"]
    assert (model["label"], model["source"], model["dataset"].name) == ("tiny_bert", "transformer", "text")
    assert at.radio(key="prune_structure").value == "nm"
    assert at.selectbox(key="prune_nm").value == "4:8"
    assert at.session_state["recipe"].scoring.nm == "4:8"
    params = dict(at.query_params)
    assert params["model"] == "tiny_bert" and params["data"] == "text" and params["nm"] == "4:8"


def test_the_transformer_choice_travels_in_the_url_and_the_model_page_shows_it():
    at = open_page("app_pages/prune.py", model="tiny_gpt2", data="text")
    at.radio(key="prune_structure").set_value("nm").run()
    at.selectbox(key="prune_nm").set_value("4:8").run()
    params = dict(at.query_params)
    assert (params["model"], params["structure"], params["nm"]) == ("tiny_gpt2", "nm", "4:8")

    reloaded = AppTest.from_file("../app.py", default_timeout=120)  # the default page (Model), as at the site root
    for key, value in params.items():
        reloaded.query_params[key] = value
    reloaded.run()
    assert reloaded.session_state["current_model"]["label"] == "tiny_gpt2"
    assert reloaded.radio(key="model_source").value == "Transformer"
    assert reloaded.selectbox(key="tf_model").value == "tiny_gpt2"
    reloaded.switch_page("app_pages/prune.py").run()
    assert reloaded.selectbox(key="prune_nm").value == "4:8"


def test_an_uploaded_text_file_in_a_link_is_named_and_the_built_in_text_shown():
    at = open_page("app_pages/prune.py", model="tiny_bert", data="text", text_file="reviews.csv")
    assert at.session_state["current_model"]["dataset"].name == "text"
    assert at.session_state["current_model"]["spec"].data_file is None
    assert len(at.info) >= 1 and "'reviews.csv'" in at.info[0].value and "cannot be restored" in at.info[0].value
    assert "text_file" not in dict(at.query_params)  # the session now shows the built-in text
    assert not at.error


def test_a_link_to_a_missing_hf_folder_falls_back_with_a_warning(tmp_path):
    at = open_page("app_pages/prune.py", model=f"hf:{tmp_path / 'nowhere'}", data="text", structure="nm")
    assert at.session_state["current_model"]["label"] == "mlp"
    assert any("cannot be loaded here" in w.value for w in at.warning)
    assert not at.error


def test_a_link_to_an_hf_folder_reopens_it_and_the_model_page_names_the_folder(tmp_path):
    from explorer import hf

    bundle = hf.builtin("tiny_bert")
    folder = hf.save_hf(bundle.model, bundle.tokenizer, tmp_path / "bert")
    at = AppTest.from_file("../app.py", default_timeout=120)  # the Model page, as at the site root
    at.query_params.update(model=f"hf:{folder}", data="text", structure="unstructured", sparsity="0.6")
    at.run()
    assert not at.exception and not at.error
    assert at.session_state["current_model"]["label"] == f"hf:{folder}"
    assert at.selectbox(key="tf_model").value == "local Hugging Face folder"
    assert at.text_input(key="tf_folder").value == str(folder)
    assert dict(at.query_params)["model"] == f"hf:{folder}"
