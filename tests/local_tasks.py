"""A small local lm-eval task over the bundled held-out text: which line comes next in this Python code?

Each item: six consecutive lines of a held-out module as context, and four candidate next lines: the real one
and three with two of its words swapped. Built deterministically; the demo model never saw this text."""
from __future__ import annotations

import json
import random
from pathlib import Path

from qrunner._paths import asset

TASK = "python_next_line"

YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: "\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_task(folder: Path, items: int = 48, seed: int = 0) -> Path:
    """The task's data (`items.jsonl`) and its lm-eval YAML in `folder`; returns the folder (eval.tasks_include)."""
    lines = asset("corpus/heldout.txt").read_text().splitlines()
    candidates = [i for i in range(6, len(lines)) if len(set(lines[i].split())) >= 5]
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "items.jsonl"
    with open(data, "w") as f:
        for i in sorted(rng.sample(candidates, items)):
            words, indent = lines[i].split(), lines[i][: len(lines[i]) - len(lines[i].lstrip())]
            wrong: list = []
            while len(wrong) < 3:
                a, b = rng.sample(range(len(words)), 2)
                swapped = list(words)
                swapped[a], swapped[b] = words[b], words[a]
                shuffled = indent + " ".join(swapped)
                if shuffled != lines[i] and shuffled not in wrong:
                    wrong.append(shuffled)
            label = rng.randrange(4)
            choices = wrong[:label] + [lines[i]] + wrong[label:]
            f.write(json.dumps({"context": "\n".join(lines[i - 6:i]), "choices": choices, "label": label}) + "\n")
    (folder / f"{TASK}.yaml").write_text(YAML.format(task=TASK, data=data))
    return folder
