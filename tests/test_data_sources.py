"""Where rows come from: TSV, JSONL, text and pydoc sources, bad files, a hub data set offline."""

import pytest

from lorapipe.config import UserError
from lorapipe.data_sources import LINE, load_rows


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
