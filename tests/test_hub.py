import pytest
import yaml

from lorapipe.config import UserError, parse_params
from lorapipe.hub import push
from tests.conftest import ROOT


def hub_params(**hub):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["hub"].update(hub)
    return parse_params(raw)


def test_push_is_opt_in(tmp_path):
    with pytest.raises(UserError, match=r"hub\.push: false; set it to true to opt in"):
        push(hub_params(), tmp_path)


def test_dry_run_lists_files_without_network(tmp_path, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("a dry run must not touch the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    adapter = tmp_path / "models/adapter"
    adapter.mkdir(parents=True)
    for name in ("README.md", "adapter_config.json", "adapter_model.safetensors"):
        (adapter / name).write_text("x")
    plan = push(hub_params(push=True, repo_id="me/minilm-sst2-lora"), tmp_path)
    assert plan["dry_run"] and plan["private"] and plan["repo_id"] == "me/minilm-sst2-lora"
    assert plan["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_push_needs_a_repo_id(tmp_path):
    with pytest.raises(UserError, match=r"hub\.repo_id: required"):
        push(hub_params(push=True), tmp_path)
