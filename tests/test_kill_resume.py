"""Kill safety and exact resume: a checkpoint is complete or ignored, a killed run resumes from
the last complete one, and ends bit for bit where an uninterrupted run ends."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hrpo import run as hrpo_run, train
from hrpo.checkpoint import (COMPLETE_MARKER, discard_checkpoint, incomplete_reason, latest_complete_checkpoint,
                             mark_complete, rotate_checkpoints)
from testing.processes import run_child
from testing.training import length_reward, module_of, save_training_workspace, tiny_training_args, trainable

REPO = Path(__file__).resolve().parent.parent
TIMING = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")


# ---------------------------------------------------------------- markers and rotation (no training)

def fake_folder(root: Path, step: int, complete: bool = True) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"x" * (10 + step))
    (folder / "sub").mkdir()
    (folder / "sub" / "shard.bin").write_bytes(b"y" * 3)
    if complete:
        mark_complete(folder, step)
    return folder


def test_only_a_marked_checkpoint_with_every_listed_file_is_complete(tmp_path):
    done, partial = fake_folder(tmp_path, 2), fake_folder(tmp_path, 3, complete=False)
    assert incomplete_reason(done) is None
    assert "no completion marker" in incomplete_reason(partial)
    marker = json.loads((done / COMPLETE_MARKER).read_text())
    assert marker == {"step": 2, "files": {"adapter_model.safetensors": 12, "sub/shard.bin": 3}}
    folder, skipped = latest_complete_checkpoint(tmp_path)
    assert folder == done and [(p.name, "no completion marker" in why) for p, why in skipped] == [("checkpoint-3", True)]
    (done / "sub" / "shard.bin").write_bytes(b"y")  # truncated after it was marked
    assert "sub/shard.bin has 1 bytes, 3 when it was saved" == incomplete_reason(done)
    (done / "sub" / "shard.bin").unlink()
    assert incomplete_reason(done) == "sub/shard.bin is missing"
    assert latest_complete_checkpoint(tmp_path) == (None, [(partial, incomplete_reason(partial)), (done, "sub/shard.bin is missing")])


def test_the_marker_is_written_aside_and_renamed(tmp_path, monkeypatch):
    """A kill while the marker is being written leaves no marker, never a half one."""
    folder = fake_folder(tmp_path, 1, complete=False)

    def killed(*_):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        mark_complete(folder)
    assert not (folder / COMPLETE_MARKER).exists() and incomplete_reason(folder).startswith("no completion marker")


def test_a_discarded_checkpoint_loses_its_marker_before_its_files(tmp_path, monkeypatch):
    folder = fake_folder(tmp_path, 1)
    import shutil

    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        discard_checkpoint(folder)
    assert (folder / "adapter_model.safetensors").exists() and incomplete_reason(folder) is not None


def test_rotation_keeps_the_newest_complete_ones_and_drops_stale_partials(tmp_path):
    for step in (1, 2, 4, 5):
        fake_folder(tmp_path, step)
    fake_folder(tmp_path, 3, complete=False)  # an interrupted save, older than the newest complete one
    fake_folder(tmp_path, 6, complete=False)  # newer: maybe being written right now
    # the trainer's rule: at most `keep` complete ones, counting the newest and the best (protected)
    removed = rotate_checkpoints(tmp_path, keep=3, protected=[str(tmp_path / "checkpoint-1")])
    assert sorted(p.name for p in removed) == ["checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-4", "checkpoint-5",
                                                          "checkpoint-6"]
    assert rotate_checkpoints(tmp_path, keep=None) == []


def test_resume_without_a_complete_checkpoint_names_the_partial_one(tmp_path, capsys):
    fake_folder(tmp_path / "out", 3, complete=False)
    argv = ["--model_name", "x", "--output_dir", str(tmp_path / "out"), "--resume"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and "checkpoint-3 is partial (no completion marker" in err
    assert "--mark-complete" in err


def test_mark_complete_command_refuses_an_unfinished_folder(tmp_path, capsys):
    from hrpo import checkpoint

    folder = fake_folder(tmp_path, 1, complete=False)
    with pytest.raises(SystemExit):
        checkpoint.main(["--mark-complete", str(folder)])
    (folder / "trainer_state.json").write_text("{}")
    (folder / "adapter_config.json").write_text("{}")
    assert checkpoint.main(["--mark-complete", str(folder)]) == 0 and incomplete_reason(folder) is None


# ---------------------------------------------------------------- resume loads the trained weights

def test_resume_loads_the_trained_adapter_and_thinking_modules_into_the_optimizers_parameters(tmp_path):
    """TRL keeps a frozen "ref" adapter beside "default"; the trainer saves it in a subfolder and,
    on resume, loaded only the subfolders: LoRA and the thinking modules restarted from their
    initial weights while the optimizer state and step counter came back."""
    workspace = save_training_workspace(tmp_path / "ws")
    trained = hrpo_run.build_trainer(tiny_training_args(workspace, tmp_path / "out"), reward_funcs=[length_reward])
    trained.train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert (checkpoint / "ref" / "adapter_config.json").exists() and incomplete_reason(checkpoint) is None
    resumed = hrpo_run.build_trainer(tiny_training_args(workspace, tmp_path / "out2"), reward_funcs=[length_reward])
    resumed._load_from_checkpoint(str(checkpoint))
    want, got = trainable(trained.model), trainable(resumed.model)
    assert want.keys() == got.keys() and {module_of(n) for n in got} >= {"lora", "thinking_projection"}
    stale = [n for n in want if not torch.equal(want[n], got[n])]
    assert not stale, stale[:5]
    in_optimizer = {id(p) for group in resumed.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in in_optimizer for p in got.values())  # loaded in place: the optimizer steps them


# ---------------------------------------------------------------- killed runs (child processes)

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return save_training_workspace(tmp_path_factory.mktemp("kill"), problems=32)


def flags(workspace, out):
    return ["--model_name", str(workspace / "model"), "--dataset_path", str(workspace / "train.jsonl"),
            "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "2", "--group_size", "4", "--max_completion_length", "10",
            "--max_prompt_length", "512", "--lora_rank", "4", "--lr", "1e-2", "--lr_residual_gate", "1e-2",
            "--lr_residual_Lambda", "1e-2", "--lr_thinking_projection", "1e-2", "--warmup_ratio", "0.25",
            "--save_steps", "1", "--save_total_limit", "2", "--thinking_latent_source", "projection"]


def child(workspace, out, *ours, resume=False):
    argv = [sys.executable, "-m", "testing.run_training", *ours, "--", *flags(workspace, out)]
    return argv + (["--resume"] if resume else [])


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(argv, expect=0):
    proc = run_child(argv, timeout=600, what="a training run", check=False, env=env(), cwd=REPO)
    assert proc.returncode == expect, f"exit {proc.returncode}, expected {expect}:\n{proc.stdout[-3000:]}\n" \
                                      f"{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def uninterrupted(workspace):
    out = workspace / "uninterrupted"
    run(child(workspace, out))
    return out


def history(folder: Path) -> list[dict]:
    rows = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def assert_same_end(resumed: Path, reference: Path):
    """Bit-identical adapter (LoRA and the four thinking modules), optimizer, scheduler and
    logged metrics at the last step."""
    from safetensors.torch import load_file

    want = load_file(reference / "checkpoint-4" / "adapter_model.safetensors")
    got = load_file(resumed / "checkpoint-4" / "adapter_model.safetensors")
    assert want.keys() == got.keys() and any("thinking_projection" in k for k in got)
    differ = {k: (got[k] - want[k]).abs().max().item() for k in want if not torch.equal(want[k], got[k])}
    assert not differ, differ
    for name in ("optimizer.pt", "scheduler.pt"):
        a = torch.load(reference / "checkpoint-4" / name, weights_only=False)
        b = torch.load(resumed / "checkpoint-4" / name, weights_only=False)
        assert repr(a) == repr(b) if name == "scheduler.pt" else all(
            torch.equal(a["state"][i][f], b["state"][i][f]) for i in a["state"] for f in ("exp_avg", "exp_avg_sq"))
    assert history(resumed / "checkpoint-4") == history(reference / "checkpoint-4")
    assert all(incomplete_reason(f) is None for f in resumed.glob("checkpoint-*"))
    assert sorted(f.name for f in resumed.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]  # limit 2


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_save_then_resume_ends_bit_identical(workspace, uninterrupted):
    out = workspace / "killed-in-save"
    killed = run(child(workspace, out, "--kill-in-save", "3"), expect=-signal.SIGKILL)
    assert "SIGKILL in the save of checkpoint-3" in killed.stdout
    partial = out / "checkpoint-3"
    assert (partial / "adapter_model.safetensors").exists() and not (partial / COMPLETE_MARKER).exists()
    assert incomplete_reason(out / "checkpoint-2") is None
    resumed = run(child(workspace, out, resume=True))
    assert f"continuing from {out / 'checkpoint-2'} (complete)" in resumed.stdout
    assert f"skipped {partial} (partial: no completion marker" in resumed.stdout
    assert_same_end(out, uninterrupted)


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume_ends_bit_identical(workspace, uninterrupted):
    seed = random.randrange(10**6)
    delay = random.Random(seed).uniform(0.0, 1.2)
    out = workspace / "killed-at-random"
    proc = subprocess.Popen(child(workspace, out, "--step-delay", "0.5"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO)
    deadline = time.monotonic() + 300
    while incomplete_reason(out / "checkpoint-1") is not None:  # training has started: kill inside steps 2-4
        assert proc.poll() is None, f"the run ended before its first checkpoint:\n{proc.communicate()[1][-5000:]}"
        assert time.monotonic() < deadline, "no checkpoint-1 within 300 s"
        time.sleep(0.05)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"seed {seed}: the run ended before the kill:\n{stderr[-3000:]}"
    latest, skipped = latest_complete_checkpoint(out)
    print(f"seed {seed}: SIGKILL {delay:.2f} s after checkpoint-1; latest complete {latest.name}, "
          f"partial {[p.name for p, _ in skipped]}")
    resumed = run(child(workspace, out, resume=True))
    assert f"continuing from {latest} (complete)" in resumed.stdout, resumed.stdout[-2000:]
    assert_same_end(out, uninterrupted)
