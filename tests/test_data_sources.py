"""Calibration text from every supported source, and the short-sample policies."""
import json

import pytest
import torch

from qrunner.data_sources import concatenated_windows, long_document_windows, read_documents
from qrunner.errors import UserError

DOCS = ["def f():\n    return 1", "class A:\n    pass", "import os\nprint(os.sep)"]


def test_builtin_corpora_are_distinct_and_nonempty():
    calib, _ = read_documents("builtin", "auto", "text", "calibration")
    held, _ = read_documents("builtin", "auto", "text", "evaluation")
    assert len(calib) > 100 and len(held) > 50
    assert not set(calib[:200]) & set(held[:200]) - {""}


def test_text_jsonl_parquet_and_datasets_folder_give_the_same_documents(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(DOCS) + "\n")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS}), tmp_path / "a.parquet")
    from datasets import Dataset

    Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "ds"))
    for name in ("a.txt", "a.jsonl", "a.parquet", "ds"):
        docs, origin = read_documents(str(tmp_path / name), "auto", "text", "calibration")
        assert docs == DOCS, name
        assert "3 documents" in origin


def test_missing_column_names_the_available_ones(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": DOCS}), tmp_path / "a.parquet")
    with pytest.raises(UserError, match="column 'text' not in .*columns: body"):
        read_documents(str(tmp_path / "a.parquet"), "auto", "text", "calibration")


def test_concatenation_joins_documents_with_separator_and_cuts_full_windows():
    windows = concatenated_windows([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seqlen=4, separator=0)
    assert windows.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]


def test_drop_policy_counts_short_documents_and_windows_long_ones():
    g = torch.Generator().manual_seed(0)
    windows, dropped = long_document_windows([[1, 2], list(range(10)), [3], list(range(20, 26))], 5, g)
    assert dropped == 2 and windows.shape == (2, 5)
    assert windows[0].tolist() == list(range(windows[0, 0].item(), windows[0, 0].item() + 5))
