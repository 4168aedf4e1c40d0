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
    _load("bench_speculative").main([str(model_dir), "--device", "cpu", "--batches", "1,2",
                                     "--max-tokens", "8", "--k", "2", "--single-prompts", "2"])
    report = json.loads((tmp_path / "speculative.json").read_text())
    assert [(r["batch"], r["temperature"]) for r in report["rows"]] == [
        (1, 0.0), (1, 1.0), (2, 0.0), (2, 1.0)]
    assert all(r["speedup"] > 0 for r in report["rows"])


def test_train_head_on_saved_mixed_data_into_a_new_directory(tmp_path, capsys):
    """Greedy and sampled data saved once and reused; a last-layer start, bf16 autocast;
    the head lands in --out (which links the model's files), the model dir is untouched."""
    model_dir, out, data = tmp_path / "demo", tmp_path / "with_head", tmp_path / "data.json"
    shutil.copytree(DEMO, model_dir)
    common = [str(model_dir), "--device", "cpu", "--steps", "2", "--prompts", "4", "--n", "2",
              "--greedy-prompts", "3", "--batch", "4", "--eval-prompts", "4", "--k", "2",
              "--data", str(data), "--max-tokens", "8"]
    _load("train_mtp_head").main(common + ["--init", "last-layer", "--bf16", "--out", str(out)])
    sequences = json.loads(data.read_text())
    assert len(sequences) == 4 * 2 + 3
    assert "num_nextn_predict_layers" not in json.loads((model_dir / "config.json").read_text())
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert (out / "mtp.safetensors").exists() and (out / "model.safetensors").is_symlink()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()
             if line.startswith("{")]
    assert [r["temperature"] for r in lines] == [1.0, 0.0]
    data.write_text(json.dumps(sequences[:5]))  # reused as is, not made again
    _load("train_mtp_head").main(common + ["--out", str(tmp_path / "second")])
    assert "data: 5 sequences" in capsys.readouterr().out
    _load("train_mtp_head").main([str(out), "--device", "cpu", "--steps", "0", "--k", "2",
                                  "--eval-prompts", "4", "--max-tokens", "8"])
    lines = capsys.readouterr().out.splitlines()  # measured only: nothing made or trained
    assert [json.loads(line)["temperature"] for line in lines] == [1.0, 0.0]


def test_copy_last_layer_starts_the_block_from_the_policys_last():
    import torch
    from transformers import AutoModelForCausalLM

    from atom_rollout.rl.mtp_head import MTPHead
    policy = AutoModelForCausalLM.from_pretrained(DEMO)
    head = MTPHead(policy)
    _load("train_mtp_head")._copy_last_layer(head, policy)
    last = policy.model.layers[-1]
    assert torch.equal(head.layers[0].mlp.down_proj.weight, last.mlp.down_proj.weight)
    assert torch.equal(head.layers[0].self_attn.q_proj.weight, last.self_attn.q_proj.weight)
    assert head.layers[0].mlp.down_proj.weight.data_ptr() != last.mlp.down_proj.weight.data_ptr()


def test_train_head_with_single_step_cross_entropy(tmp_path, capsys):
    model_dir = tmp_path / "demo"
    shutil.copytree(DEMO, model_dir)
    _load("train_mtp_head").main([str(model_dir), "--device", "cpu", "--steps", "3",
                                  "--prompts", "4", "--batch", "4", "--eval-prompts", "8",
                                  "--loss", "ce", "--depth", "1"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(result["acceptance_by_position"]) == 3
