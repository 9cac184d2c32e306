"""A non-editable install carries conf/, recipes/, the demo model and the Hydra plugin."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO


def test_wheel_contains_configs_and_works_outside_the_source_tree(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("qrunner-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("qrunner/conf/config.yaml", "qrunner/conf/scheme/w4a16.yaml", "qrunner/recipes/demo.yaml",
                     "qrunner/recipes/qwen3_w4a16.yaml", "qrunner/assets/demo-llama/model.safetensors",
                     "qrunner/assets/corpus/calibration.txt", "qrunner/assets/prompts.txt",
                     "hydra_plugins/qrunner_recipes/__init__.py"):
        assert required in names, required
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-m", "qrunner", "recipe=qwen3_w4a16", "model.path=/m", "--cfg", "job"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "seqlen: 2048" in out.stdout and "bits: 4" in out.stdout
    where = subprocess.run([sys.executable, "-c", "import qrunner._paths as p; print(p.conf_dir())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert Path(where.stdout.strip()) == site / "qrunner" / "conf"
