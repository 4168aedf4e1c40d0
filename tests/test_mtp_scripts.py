"""Smoke runs of the MTP head trainer and the speculation benchmark on the demo model."""
import importlib.util
import json
import shutil
from pathlib import Path

import atom_rollout.rl

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
DEMO = Path(atom_rollout.rl.__file__).parent / "demo_model"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_head_then_bench_speculation(tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "demo"
    shutil.copytree(DEMO, model_dir)
    _load("train_mtp_head").main([str(model_dir), "--device", "cpu", "--steps", "20",
                                  "--prompts", "16", "--batch", "8", "--k", "2"])
    config = json.loads((model_dir / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and (model_dir / "mtp.safetensors").exists()
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(result["acceptance_by_position"]) == 2
    monkeypatch.setenv("OUT", str(tmp_path))
    _load("bench_speculative").main([str(model_dir), "--device", "cpu", "--batches", "2",
                                     "--max-tokens", "8", "--k", "2"])
    report = json.loads((tmp_path / "speculative.json").read_text())
    assert [r["temperature"] for r in report["rows"]] == [0.0, 1.0]
    assert all(r["speedup"] > 0 for r in report["rows"])


def test_train_head_with_single_step_cross_entropy(tmp_path, capsys):
    model_dir = tmp_path / "demo"
    shutil.copytree(DEMO, model_dir)
    _load("train_mtp_head").main([str(model_dir), "--device", "cpu", "--steps", "3",
                                  "--prompts", "4", "--batch", "4", "--eval-prompts", "8",
                                  "--loss", "ce", "--depth", "1"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(result["acceptance_by_position"]) == 3
