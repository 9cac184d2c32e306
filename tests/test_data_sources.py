"""Calibration text from every supported source, and the short-sample policies."""
import json

import pytest
import torch

from qrunner.data_sources import long_document_windows, read_documents, stream_windows, token_stream
from qrunner.errors import UserError

DOCS = ["def f():\n    return 1", "class A:\n    pass", "import os\nprint(os.sep)"]


def test_builtin_corpora_are_distinct_single_documents():
    (calib,), _ = read_documents("builtin", "auto", "text", "calibration")
    (held,), _ = read_documents("builtin", "auto", "text", "evaluation")
    assert len(calib) > 300_000 and len(held) > 100_000
    assert held[:2000] not in calib and calib[:2000] not in held


def test_text_file_is_one_document_as_it_is_unless_split_into_paragraphs(tmp_path):
    text = "\n\n".join(DOCS) + "\n\n\n"
    (tmp_path / "a.txt").write_text(text)
    docs, origin = read_documents(str(tmp_path / "a.txt"), "auto", "text", "calibration")
    assert docs == [text] and "1 documents" in origin
    docs, _ = read_documents(str(tmp_path / "a.txt"), "auto", "text", "calibration", split_paragraphs=True)
    assert docs == DOCS


def test_jsonl_parquet_datasets_folder_and_paragraphs_give_the_same_documents(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(DOCS) + "\n")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS}), tmp_path / "a.parquet")
    from datasets import Dataset

    Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "ds"))
    for name in ("a.txt", "a.jsonl", "a.parquet", "ds"):
        docs, origin = read_documents(str(tmp_path / name), "auto", "text", "calibration", split_paragraphs=True)
        assert docs == DOCS, name
        assert "3 documents" in origin


def test_missing_column_names_the_available_ones(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": DOCS}), tmp_path / "a.parquet")
    with pytest.raises(UserError, match="column 'text' not in .*columns: body"):
        read_documents(str(tmp_path / "a.parquet"), "auto", "text", "calibration")


class CharTokenizer:
    """One token per character; id 0 is the end-of-text token; `bos` is put first when set (as Llama's does)."""

    eos_token_id = 0

    def __init__(self, bos=None):
        self.bos = bos

    def __call__(self, texts, add_special_tokens=True, verbose=True):
        one = isinstance(texts, str)
        ids = [[ord(c) for c in t] for t in ([texts] if one else texts)]
        if add_special_tokens and self.bos is not None:
            ids = [[self.bos] + i for i in ids]
        return {"input_ids": ids[0] if one else ids}


def test_documents_are_joined_with_the_separator_text_and_tokenized_once():
    stream = token_stream(CharTokenizer(bos=1), ["ab", "c"], "\n\n", "data.separator")
    assert stream == [1, ord("a"), ord("b"), 10, 10, ord("c")]  # one BOS for the whole stream, no EOS
    assert stream_windows(stream, 4).tolist() == [stream[:4]]  # non-overlapping, the short tail left out
    assert stream_windows(stream, 3).tolist() == [stream[:3], stream[3:]]


def test_eos_separator_puts_the_end_of_text_token_between_separately_tokenized_documents():
    stream = token_stream(CharTokenizer(bos=1), ["ab", "c"], "eos", "data.separator")
    assert stream == [ord("a"), ord("b"), 0, ord("c"), 0]
    no_eos = CharTokenizer()
    no_eos.eos_token_id = None
    with pytest.raises(UserError, match="data.separator=eos: the tokenizer has no end-of-text token"):
        token_stream(no_eos, ["ab"], "eos", "data.separator")


def test_drop_policy_counts_short_documents_and_windows_long_ones():
    g = torch.Generator().manual_seed(0)
    windows, dropped = long_document_windows([[1, 2], list(range(10)), [3], list(range(20, 26))], 5, g)
    assert dropped == 2 and windows.shape == (2, 5)
    assert windows[0].tolist() == list(range(windows[0, 0].item(), windows[0, 0].item() + 5))
