"""Calibration prompts for diffusion models: the bundled list and local .txt / .jsonl / .tsv files."""
from __future__ import annotations

import json

import pytest

from qrunner.errors import UserError
from qrunner.prompts import choose_prompts, read_prompts


def test_builtin_prompts_are_bundled_and_distinct():
    prompts, where = read_prompts("builtin")
    assert len(prompts) == 64 and len(set(prompts)) == 64
    assert "64 prompts" in where
    assert all(3 <= len(p.split()) <= 20 for p in prompts)


def test_each_file_type_gives_the_same_prompts(tmp_path):
    wanted = ["a cat on a mat", "a dog in the fog", "a boat, at dusk"]
    (tmp_path / "p.txt").write_text("\n".join([wanted[0], "", wanted[1], wanted[2]]) + "\n")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"id": i, "caption": p}) for i, p in enumerate(wanted)))
    (tmp_path / "p.tsv").write_text("id\tcaption\n" + "".join(f"{i}\t{p}\n" for i, p in enumerate(wanted)))
    for name in ("p.txt", "p.jsonl", "p.tsv"):
        assert read_prompts(str(tmp_path / name))[0] == wanted, name
    (tmp_path / "q.jsonl").write_text(json.dumps({"caption": "no", "desc": "yes"}) + "\n")
    assert read_prompts(str(tmp_path / "q.jsonl"), text_field="desc")[0] == ["yes"]


def test_choice_is_seeded_without_repeats_and_refuses_too_many():
    prompts = [f"prompt {i}" for i in range(10)]
    a, b = choose_prompts(prompts, 6, seed=42), choose_prompts(prompts, 6, seed=42)
    assert a == b and len(set(a)) == 6 and set(a) <= set(prompts)
    assert choose_prompts(prompts, 6, seed=7) != a
    with pytest.raises(UserError, match="data.nsamples=11 but the prompt source holds 10 prompts"):
        choose_prompts(prompts, 11, seed=42)


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "p.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unknown prompt file type '.csv'"):
        read_prompts(str(tmp_path / "p.csv"))
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(UserError, match="holds no prompts"):
        read_prompts(str(tmp_path / "e.txt"))
    (tmp_path / "h.tsv").write_text("id\tdescription\n1\tx\n")
    with pytest.raises(UserError, match="has no 'text' field.*data.text_field"):
        read_prompts(str(tmp_path / "h.tsv"))
