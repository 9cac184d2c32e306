"""The scheme=auto parts of report.md / the console summary / the bits-per-layer plot (qrunner.report.autoscheme),
on synthetic report dicts shaped like a real report.json."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import pytest

from qrunner.report import autoscheme as rep_auto
from qrunner.report.autoscheme import (autoscheme_table, block_of, budgets_table, option_bits, plot_autoscheme,
                                       summary_line)
from qrunner.report.write import markdown, print_summary, write_report

# Model order on purpose: block 9 before block 10 (a sorted order would put "model.layers.10" first).
OPTION_OF_LAYER = {
    "model.layers.9.self_attn.q_proj": "w4a16",
    "model.layers.9.mlp.up_proj": "w2a16g64",
    "model.layers.9.mlp.down_proj": "bf16",
    "model.layers.10.self_attn.q_proj": "w2a16g64",
    "model.layers.10.mlp.up_proj": "w2a16g64",
    "model.layers.10.mlp.down_proj": "w4a16",
}


def autoscheme(**changes: Any) -> Dict[str, Any]:
    auto = {
        "avg_bits_target": 3.0,
        "avg_bits": 2.984375,
        "estimated_loss_increase": 2.6050129130085247,
        "options": ["w2a16g64", "w4a16", "w8a16", "bf16"],
        "decisions": 6,
        "layers_per_option": {"w2a16g64": 3, "w4a16": 2, "w8a16": 0, "bf16": 1},
        "weight_share_per_option": {"w2a16g64": 0.625, "w4a16": 0.2916666666666667, "w8a16": 0.0,
                                    "bf16": 0.08333333333333333},
        "option_of_layer": dict(OPTION_OF_LAYER),
        "option_loss": {"w2a16g64": 2.9262299930348115, "w4a16": 2.8814415090224323, "w8a16": 2.87946,
                        "bf16": None},
        "ignore_scale_zp_bits": False,
    }
    auto.update(changes)
    return auto


BUDGETS = [
    {"avg_bits_target": 2.5, "avg_bits": 2.49381, "ppl_quantized": 51.23456, "ppl_original": 46.791,
     "run_dir": "/runs/a", "export_dir": "/runs/a/model"},
    {"avg_bits_target": 3.0, "avg_bits": 2.984375, "ppl_quantized": None, "ppl_original": None,
     "run_dir": "/runs/b", "export_dir": "/runs/b/model"},
]


def base_report(tmp_path: Path) -> Dict[str, Any]:
    """The keys markdown() and write_report() read, as build_report writes them (no autoscheme)."""
    return {
        "created_at": "2026-01-01T00:00:00",
        "run_dir": str(tmp_path),
        "recipe": "demo",
        "model": "/models/demo-llama",
        "scheme": {"name": "w4a16", "bits": 4, "group_size": 128, "sym": True, "data_type": "int", "act_bits": 16},
        "quant": {"iters": 0},
        "memory": {"mode": "low"},
        "wall_seconds": 12.5,
        "peak_rss_mb": 596.1,
        "stages": [{"name": "load", "status": "ran", "seconds": 0.04, "peak_rss_mb": 403.3, "metrics": {}},
                   {"name": "evaluate", "status": "ran", "seconds": 3.5, "peak_rss_mb": 520.0, "metrics": {}}],
        "quality": {"ppl_original": 46.791, "ppl_quantized": 47.4789, "ppl_ratio": 1.0147},
        "tasks": {},
        "block_loss": [0.139, 0.289],
        "block_loss_rtn": [0.14, 0.3],
        "export_dir": str(tmp_path / "model"),
        "memory_timeline": {"samples": [], "marks": []},
        "restarts": [],
        "full_precision_layers": {"count": 0, "names": [], "reasons": {}, "share_of_weights": 0.0},
    }


def auto_report(tmp_path: Path, **changes: Any) -> Dict[str, Any]:
    report = base_report(tmp_path)
    report["scheme"] = dict(report["scheme"], name="auto")
    report["autoscheme"] = autoscheme(**changes)
    return report


TABLE = [
    "",
    "AutoScheme: 2.9844 average bits for a 3 budget (scales and zero points counted), "
    "estimated loss increase 2.6050",
    "",
    "| option | layers | share of weights | loss with the option everywhere |",
    "|---|---:|---:|---:|",
    "| w2a16g64 | 3 | 62.50 % | 2.9262 |",
    "| w4a16 | 2 | 29.17 % | 2.8814 |",
    "| w8a16 | 0 | 0.00 % | 2.8795 |",
    "| bf16 | 1 | 8.33 % |  |",
]

BUDGET_TABLE = [
    "",
    "| budget | average bits | perplexity | export |",
    "|---:|---:|---:|---|",
    "| 2.5 | 2.4938 | 51.2346 | `/runs/a/model` |",
    "| 3 | 2.9844 |  | `/runs/b/model` |",
]


def test_option_bits_and_blocks():
    assert [option_bits(o) for o in ("w2a16g64", "w4a16", "w8a16", "W3A16_asym", "bf16", "fp16", "int4")] == \
        [2, 4, 8, 3, 16, 16, None]
    assert block_of("model.layers.3.mlp.down_proj") == "model.layers.3"
    assert block_of("model.language_model.layers.12.self_attn.q_proj") == "model.language_model.layers.12"
    assert block_of("lm_head") == "lm_head"


def test_autoscheme_table_exact():
    assert autoscheme_table(autoscheme()) == TABLE
    ignored = autoscheme_table(autoscheme(ignore_scale_zp_bits=True, avg_bits=4.25, avg_bits_target=4.5,
                                          estimated_loss_increase=0.01234))[1]
    assert ignored == ("AutoScheme: 4.2500 average bits for a 4.5 budget (scales and zero points ignored), "
                       "estimated loss increase 0.0123")
    assert autoscheme_table(None) == [] and autoscheme_table({}) == []


def test_budgets_table_exact():
    assert budgets_table(BUDGETS) == BUDGET_TABLE
    assert budgets_table(None) == [] and budgets_table([]) == []


def test_markdown_places_autoscheme_after_perplexity(tmp_path):
    lines = markdown(auto_report(tmp_path), []).splitlines()
    ratio = lines.index("| ratio | 1.0147 |")
    assert lines[ratio + 1:ratio + 1 + len(TABLE)] == TABLE
    # the per-block loss table still follows
    after = ratio + 1 + len(TABLE)
    assert lines[after:after + 2] == ["", "| block | loss before tuning (RTN) | loss after |"]
    assert not any(line.startswith("| budget |") for line in lines)


def test_markdown_budgets_table(tmp_path):
    report = auto_report(tmp_path)
    report["budgets"] = BUDGETS
    lines = markdown(report, []).splitlines()
    at = lines.index(TABLE[-1]) + 1
    assert lines[at:at + len(BUDGET_TABLE)] == BUDGET_TABLE


def test_markdown_without_autoscheme_has_no_autoscheme_lines(tmp_path):
    text = markdown(base_report(tmp_path), [])
    assert "AutoScheme" not in text
    assert "| option |" not in text and "| budget |" not in text
    lines = text.splitlines()
    ratio = lines.index("| ratio | 1.0147 |")
    assert lines[ratio + 1:ratio + 3] == ["", "| block | loss before tuning (RTN) | loss after |"]


def test_write_report_adds_the_plot(tmp_path):
    md = write_report(auto_report(tmp_path), tmp_path)
    png = tmp_path / "bits_per_layer.png"
    assert png.is_file() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert "![bits_per_layer](bits_per_layer.png)" in text
    assert "| w2a16g64 | 3 | 62.50 % | 2.9262 |" in text


def test_write_report_without_autoscheme_has_no_plot(tmp_path):
    md = write_report(base_report(tmp_path), tmp_path)
    assert not (tmp_path / "bits_per_layer.png").exists()
    assert "bits_per_layer" not in md.read_text()
    assert plot_autoscheme(base_report(tmp_path), tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()


def test_plot_content(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    assert plot_autoscheme(auto_report(tmp_path), tmp_path / "p.png") == tmp_path / "p.png"
    (fig,) = kept
    (ax, *_) = fig.axes
    points = {}
    for coll in ax.collections:
        points[coll.get_label()] = [tuple(map(float, xy)) for xy in coll.get_offsets()]
    # x = position in the given (model) order, y = the option's bits; options without layers are not drawn
    assert points == {
        "w2a16g64 (3)": [(1.0, 2.0), (3.0, 2.0), (4.0, 2.0)],
        "w4a16 (2)": [(0.0, 4.0), (5.0, 4.0)],
        "bf16 (1)": [(2.0, 16.0)],
    }
    separators = [line.get_xdata()[0] for line in ax.lines]
    assert separators == [2.5]  # one boundary: model.layers.9 | model.layers.10
    assert [t.get_text() for t in ax.get_xticklabels()] == ["9", "10"]
    assert list(ax.get_yticks()) == [2, 4, 8, 16]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["w2a16g64 (3)", "w4a16 (2)", "bf16 (1)"]
    assert ax.get_title() == "bits per layer along the depth: 2.9844 average bits (target 3)"
    colours = {coll.get_label(): tuple(coll.get_facecolor()[0]) for coll in ax.collections}
    assert len(set(colours.values())) == 3
    plt.close(fig)


def test_summary_line_and_print_summary(tmp_path, monkeypatch, capsys):
    line = ("autoscheme: 2.9844 average bits for a 3 budget; layers w2a16g64 3, w4a16 2, w8a16 0, bf16 1; "
            "estimated loss increase 2.6050")
    assert summary_line(autoscheme()) == line
    assert summary_line(autoscheme(ignore_scale_zp_bits=True)) == line.replace(
        "3 budget;", "3 budget (scales and zero points ignored);")
    monkeypatch.setenv("COLUMNS", "400")
    print_summary(auto_report(tmp_path))
    assert line in capsys.readouterr().out.splitlines()
    print_summary(base_report(tmp_path))
    assert "autoscheme" not in capsys.readouterr().out


def test_module_is_report_level_only():
    source = Path(rep_auto.__file__).read_text()
    assert "qrunner.stages" not in source and "qrunner.pipeline" not in source


@pytest.mark.parametrize("auto", [None, {}, autoscheme(option_of_layer={})])
def test_plot_none_without_layers(tmp_path, auto):
    report = base_report(tmp_path)
    if auto is not None:
        report["autoscheme"] = auto
    assert plot_autoscheme(report, tmp_path / "p.png") is None
    assert not (tmp_path / "p.png").exists()
