"""bench.collapse and its trace (hrpo.collapse_trace): a smoke run on a tiny model that must train
exactly as the same run untraced, the optimizer record against a hand-computed AdamW step, and
a failing run's error shown."""
import json
import math
import os
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from testing.processes import run_child

REPO = Path(__file__).resolve().parent.parent
# 2 steps of 4 completions of 12 tokens; a reward that varies inside every group, so gradients are not zero
SMOKE_FLAGS = ["--max_steps", "2", "--eval_samples", "2", "--max_completion_length", "12", "--max_prompt_length",
               "4096", "--per_device_train_batch_size", "4", "--lora_rank", "4",
               "--reward_funcs", "testing.training.length_reward"]


@pytest.mark.slow  # two traced and one untraced training process: about 50 s on 2 cores
def test_a_traced_run_records_every_step_and_trains_as_the_untraced_one(tmp_path):
    out = tmp_path / "collapse"
    command = [sys.executable, "-m", "bench.collapse", "--model", "tiny", "--runs", "projection:1", "projection:1:hold",
               "--out", str(out), "--threads", "1", "--", *SMOKE_FLAGS]
    proc = run_child(command, timeout=600, what="bench.collapse smoke run", cwd=REPO)
    assert "projection-seed1-hold" in proc.stdout
    assert (out / "collapse.png").stat().st_size > 0 and (out / "collapse_hold.png").stat().st_size > 0
    from bench.collapse import compact, read_trace  # the trace keeps 5 significant digits

    trace = read_trace(out / "traces" / "projection-seed1.json.gz")
    steps = trace["steps"]
    assert [s["step"] for s in steps] == [1, 2] and trace["threads"] == 1
    for step in steps:
        rows = step["completions"]
        assert len(rows) == 4
        assert all(r["tokens"] <= 12 and isinstance(r["text"], str) for r in rows)
        assert rows[0]["question"] and "question" not in rows[1]  # kept once per group of 4
        cut = sum(r["cut"] for r in rows) / len(rows)
        assert cut == pytest.approx(step["logs"]["completions/clipped_ratio"])  # TRL's count, from the token ids
        assert [r["reward"] for r in rows] == [len(r["text"]) / 10.0 for r in rows]
        thinking = step["thinking"]
        assert 0.9 < thinking["gate_a_mean"] < 1.0
        assert thinking["gate_a_mean"] == pytest.approx(step["logs"]["thinking/embeds_ratio"], abs=1e-5)
        assert thinking["latent_norm"] == pytest.approx(1.0, abs=1e-4)  # the unit projection latent
        optimizer = step["optimizer"]
        assert {"main_decay", "gate", "lambda", "projection"} <= set(optimizer)
        assert optimizer["main_decay"]["grad_norm"] > 0 and optimizer["main_decay"]["update_norm"] > 0
    # the update is the moment step plus the weight decay; the distance from the start adds up
    lora = [s["optimizer"]["main_decay"] for s in steps]
    assert lora[0]["drift_from_start"] == pytest.approx(lora[0]["update_norm"], rel=1e-4)
    assert lora[1]["drift_from_start"] <= lora[0]["update_norm"] + lora[1]["update_norm"] + 1e-6

    # the same run untraced: the same samples (integers: lengths and length rewards exactly), the same loss
    argv = shlex.split(trace["command"])[1:]
    plain_dir = tmp_path / "untraced"
    argv[argv.index("--output_dir") + 1] = str(plain_dir)
    run_child([sys.executable, str(REPO / "hrpo_gsm8k.py"), *argv], timeout=600, what="the untraced run", cwd=REPO,
              env={**os.environ, "OMP_NUM_THREADS": "1"})
    plain = [row for row in json.loads((plain_dir / "log_history.json").read_text()) if "reward" in row]
    assert compact([row["reward"] for row in plain]) == [s["logs"]["reward"] for s in steps]
    assert compact([row["completions/mean_length"] for row in plain]) == [
        s["logs"]["completions/mean_length"] for s in steps]
    for row, step in zip(plain, steps):
        assert row["loss"] == pytest.approx(step["logs"]["loss"], rel=1e-4, abs=1e-7)
        assert row["grad_norm"] == pytest.approx(step["logs"]["grad_norm"], rel=1e-4)

    # every step had a gradient: the counterfactual undid none and is the same run
    held = read_trace(out / "traces" / "projection-seed1-hold.json.gz")
    assert held["variant"] == "hold" and held["held_steps"] == []
    assert [s["logs"]["reward"] for s in held["steps"]] == [s["logs"]["reward"] for s in steps]

    again = run_child(command, timeout=300, what="bench.collapse, again", cwd=REPO)
    assert again.stdout.count("traced before, kept") == 2
    report = {run["variant"]: run for run in json.loads((out / "collapse.json").read_text())["runs"]}
    assert report[""]["arm"] == "projection" and len(report[""]["reward"]) == 2 and report["hold"]["held_steps"] == []


def test_a_failing_run_shows_its_error(tmp_path):
    command = [sys.executable, "-m", "bench.collapse", "--model", "tiny", "--runs", "grpo:1", "--out", str(tmp_path),
               "--", *SMOKE_FLAGS, "--group_size", "3"]
    proc = run_child(command, timeout=300, what="bench.collapse with a bad flag", check=False, cwd=REPO)
    assert proc.returncode == 1
    assert "grpo-seed1 failed" in proc.stderr and "must be divisible by num_generations (3)" in proc.stderr


def _fake_trainer(model, optimizer):
    tokenizer = SimpleNamespace(eos_token_id=1)
    return SimpleNamespace(optimizer=optimizer, args=SimpleNamespace(max_completion_length=4),
                           processing_class=tokenizer, state=SimpleNamespace(global_step=0), model=model)


def test_the_optimizer_record_against_a_hand_computed_adamw_step():
    """Step 1 with a gradient, step 2 with none (zero, as GRPO's with equal rewards): AdamW still
    moves by its first moment, and the trace says so, split into the moment step and the decay."""
    from hrpo.collapse_trace import CollapseTrace

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3, 4))
    lr, wd, b1, b2, eps = 1e-2, 0.1, 0.9, 0.99, 1e-8
    optimizer = torch.optim.AdamW([{"params": [weight], "name": "main_decay", "lr": lr, "weight_decay": wd}],
                                  betas=(b1, b2), eps=eps)
    trainer = _fake_trainer(torch.nn.Linear(1, 1), optimizer)
    trace = CollapseTrace(trainer)
    grads = [torch.randn(3, 4), torch.zeros(3, 4)]
    p, m, v = weight.detach().clone().double(), torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, 4,
                                                                                                   dtype=torch.float64)
    start = p.clone()
    for t, grad in enumerate(grads, start=1):
        weight.grad = grad.clone()
        trace.on_pre_optimizer_step(None, trainer.state, None)
        optimizer.step()
        trace.on_optimizer_step(None, trainer.state, None)
        trainer.state.global_step += 1
        # AdamW by hand (decoupled decay first, then the bias-corrected moment step)
        before = p.clone()
        g = grad.double()
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        moment_step = lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
        p = before * (1 - lr * wd) - moment_step
        record = trace.steps[t]["optimizer"]["main_decay"]
        assert record["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-6)
        assert record["update_norm"] == pytest.approx(float((p - before).norm()), rel=1e-4)
        assert record["adam_step_norm"] == pytest.approx(float(moment_step.norm()), rel=1e-4)
        assert record["weight_decay_step_norm"] == pytest.approx(lr * wd * float(before.norm()), rel=1e-5)
        assert record["exp_avg_norm"] == pytest.approx(float(m.norm()), rel=1e-5)
        assert record["exp_avg_sq_norm"] == pytest.approx(float(v.norm()), rel=1e-5)
        assert record["drift_from_start"] == pytest.approx(float((p - start).norm()), rel=1e-4)
    zero_step = trace.steps[2]["optimizer"]["main_decay"]
    assert zero_step["grad_norm"] == 0.0
    # with no gradient the moment step is still most of a full step: m decays by 0.9, sqrt(v) by sqrt(0.99),
    # and the bias corrections shrink from step 1 to 2 (hand values: 0.9 / 1.9 and sqrt(0.99 / 1.99) times step 1's)
    ratio = zero_step["adam_step_norm"] / trace.steps[1]["optimizer"]["main_decay"]["adam_step_norm"]
    assert ratio == pytest.approx((0.9 / 1.9) / math.sqrt(0.99 / 1.99), rel=1e-3)


def test_completion_rows_and_repetition():
    from hrpo.collapse_trace import CollapseTrace, distinct_ngram_share

    assert distinct_ngram_share([1, 2, 3, 4, 5]) == 1.0
    assert distinct_ngram_share([7, 7, 7, 7, 7, 7]) == pytest.approx(1 / 3)
    assert distinct_ngram_share([1, 2]) is None
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.AdamW([{"params": list(model.parameters()), "name": "main_decay"}])
    trace = CollapseTrace(_fake_trainer(model, optimizer))
    function = trace.wrap_reward(lambda completions, **_: [1.0 if "#### 3" in c else 0.0 for c in completions])
    rewards = function(prompts=[[{"role": "user", "content": "1+2?"}]] * 3,
                       completions=["so #### 3", "1 + 2 is", "#### x"],
                       completion_ids=[[5, 6, 1], [5, 6, 7, 8], [9, 1]])
    assert rewards == [1.0, 0.0, 0.0]
    rows = trace.steps[1]["completions"]
    assert [(r["cut"], r["marker"], r["answered"], r["tokens"]) for r in rows] == [
        (False, True, True, 3), (True, False, False, 4), (False, True, False, 2)]
    assert rows[0]["question"] == "1+2?"


def test_the_counterfactual_hold_undoes_only_steps_without_gradient():
    """bench.collapse's HoldWithoutSignal: a step on a zero gradient leaves weights and AdamW's state
    exactly as they were (copied data); a step with a gradient is AdamW's own."""
    from bench.collapse import HoldWithoutSignal

    def run(hold: bool, grads):
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(3, 4))
        optimizer = torch.optim.AdamW([{"params": [weight], "name": "main_decay", "lr": 1e-2, "weight_decay": 0.1}],
                                      betas=(0.9, 0.99))
        trainer = _fake_trainer(torch.nn.Linear(1, 1), optimizer)
        keeper = HoldWithoutSignal(trainer) if hold else None
        history = []
        for grad in grads:
            weight.grad = grad.clone()
            if keeper:
                keeper.before_step()
            optimizer.step()
            if keeper:
                keeper.after_step()
            trainer.state.global_step += 1
            state = optimizer.state.get(weight, {})
            history.append((weight.detach().clone(), {k: v.clone() for k, v in state.items()}))
        return history, keeper

    torch.manual_seed(1)
    grads = [torch.zeros(3, 4), torch.randn(3, 4), torch.zeros(3, 4), torch.randn(3, 4)]
    free, _ = run(False, grads)
    held, keeper = run(True, grads)
    assert keeper.held == [1, 3]
    assert held[0][1] == {}  # the first step had no gradient: no state, as before it
    torch.manual_seed(0)
    assert torch.equal(held[0][0], torch.randn(3, 4))  # and the initial weights, not decayed
    assert torch.equal(held[2][0], held[1][0])  # the zero-gradient step 3 kept step 2's weights ...
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(held[2][1][key], held[1][1][key])  # ... and AdamW's moments and count
    assert not torch.equal(free[2][0], free[1][0])  # where AdamW alone moves on its moments
    assert not torch.equal(held[3][0], held[2][0])  # a step with a gradient is taken
