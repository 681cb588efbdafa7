import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import tiny_moe
from transformers import TrainingArguments

from cfmoe import finetune
from cfmoe.stages import router_design
from cfmoe.config import FinetuneConfig
from cfmoe.locality import consecutive_pair_mask, locality_loss
from cfmoe.training import BiasBalance, GlobalLoads, MoETrainer, balance_loss, causal_lm_loss, global_balance_loss


def _batch(seed=0, batch=2, seq=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, seq), generator=g)
    docs = torch.zeros_like(ids)
    docs[:, seq // 2:] = 1  # a document boundary in the middle of every block
    return {"input_ids": ids, "labels": ids.clone(), "document_ids": docs}


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral", "deepseek_v3"])
def test_trainer_loss_is_lm_plus_balance_plus_lambda_locality(arch, tmp_path):
    lm = tiny_moe(arch).train()
    batch = _batch()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    weight, coef = 0.7, 0.05
    trainer = MoETrainer(model=lm, args=args, aux_loss_coef=coef, top_k=2,
                         extra_losses={"locality_loss": (weight, finetune.locality_term("js", 2))})
    loss = trainer.compute_loss(lm, dict(batch))
    out = lm(input_ids=batch["input_ids"], output_router_logits=True)
    logits = [x for x in out.router_logits if x is not None]
    mask = consecutive_pair_mask(torch.ones_like(batch["input_ids"]), batch["document_ids"])
    expected = (causal_lm_loss(out.logits, batch["input_ids"]) + coef * balance_loss(out.router_logits, 2)
                + weight * locality_loss(logits, mask, "js"))
    torch.testing.assert_close(loss, expected)


def test_global_balance_is_the_batch_balance_with_loads_averaged_over_steps():
    lm = tiny_moe("qwen2_moe").train()
    first, second = (lm(input_ids=_batch(seed)["input_ids"], output_router_logits=True).router_logits
                     for seed in (0, 1))
    # a horizon of one step is the per-batch loss
    torch.testing.assert_close(global_balance_loss(first, 2, GlobalLoads(1), update=True), balance_loss(first, 2))
    # two steps of horizon 2: the bias-corrected average (A/2 + B) / (3/2) of the two steps' selection shares
    loads = GlobalLoads(2)
    global_balance_loss(first, 2, loads, update=True)
    loss = global_balance_loss(second, 2, loads, update=True)

    def shares(logits):
        probs = torch.stack([x.reshape(-1, x.shape[-1]) for x in logits if x is not None]).softmax(-1)
        return torch.nn.functional.one_hot(probs.topk(2, dim=-1).indices, probs.shape[-1]).sum(-2).float().mean(1), probs

    (a, _), (b, probs) = shares(first), shares(second)
    expected = probs.shape[-1] * (((a / 2 + b) / 1.5) * probs.mean(1)).sum(-1).mean()
    torch.testing.assert_close(loss, expected)
    # evaluation reads the average without adding to it; the gradient reaches the routers through the probabilities
    before = loads.mean.clone()
    global_balance_loss(second, 2, loads, update=False).backward()
    assert torch.equal(loads.mean, before)
    assert all(r.weight.grad is not None for name, r in lm.named_modules() if name.endswith("mlp.gate"))
    with pytest.raises(ValueError, match="balance horizon must be >= 1 step, got 0"):
        GlobalLoads(0)


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral", "deepseek_v3"])
def test_bias_balance_moves_selections_to_the_least_loaded_experts_and_keeps_the_routers_weights(arch):
    """Auxiliary-loss-free balance: a zero bias leaves routing and output bit for bit; after a step an expert that
    took more than its layer's mean share loses `rate` and one that took fewer gains it; the chosen experts' weights
    are the router's own scores (gradients reach the routers); evaluation calls do not count; hooks come off."""
    lm = tiny_moe(arch).train()
    ids = _batch()["input_ids"]
    with torch.no_grad():
        plain = lm(input_ids=ids, output_router_logits=True)
    balance = BiasBalance(lm, rate=0.5)
    out = lm(input_ids=ids, output_router_logits=True)
    torch.testing.assert_close(out.logits, plain.logits, rtol=0, atol=0)
    counts = balance.counts.clone()
    assert counts.sum(-1).tolist() == [ids.numel() * 2] * len(counts)  # top-2 of every training token, per layer
    out.logits.sum().backward()
    assert all(r.weight.grad is not None for name, r in lm.named_modules() if name.endswith("mlp.gate"))
    balance.on_step_end(None, None, None)
    mean = counts.mean(-1, keepdim=True)
    expected = 0.5 * torch.sign(mean - counts)
    torch.testing.assert_close(balance.bias, expected)
    assert (balance.bias[counts > mean] < 0).all() and (balance.bias[counts < mean] > 0).all()
    # the bias now steers selection away from the busiest experts (a load more even than without it)
    lm.eval()
    with torch.no_grad():
        steered = lm(input_ids=ids, output_router_logits=True)
    assert balance.counts.sum() == 0  # evaluation does not count
    assert not torch.equal(steered.logits, plain.logits)
    balance.remove()
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=ids).logits, plain.logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="bias balance rate must be > 0, got 0"):
        BiasBalance(lm, 0)


def test_locality_gradient_reaches_every_router():
    lm = tiny_moe("qwen2_moe").train()
    batch = _batch()
    out = lm(input_ids=batch["input_ids"], output_router_logits=True)
    finetune.locality_term("l2", 2)(out.router_logits, batch).backward()
    routers = [m for name, m in lm.named_modules() if name.endswith("mlp.gate")]
    assert routers and all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in routers)


def test_finetune_changes_routing_and_rejects_bad_input():
    lm = tiny_moe("qwen2_moe")
    ids = np.random.default_rng(0).integers(3, 128, size=(8, 16))
    blocks = datasets.Dataset.from_dict({"input_ids": ids, "document_ids": np.zeros_like(ids),
                                         "labels": ids}).with_format("torch")
    x = torch.as_tensor(ids[:2])
    before = [r.clone() for r in lm(input_ids=x, output_router_logits=True).router_logits]
    ft = FinetuneConfig(steps=2, batch_size=4, warmup_steps=0, learning_rate=1e-2, lora_rank=4)
    result = finetune.finetune(lm, blocks, ft, kind="js", weight=1.0, top_k=2, layers=[1])
    after = result.model(input_ids=x, output_router_logits=True).router_logits
    assert torch.equal(before[0], after[0]) and not torch.equal(before[1], after[1])  # only layer 1 trained
    total = sum(p.numel() for p in result.model.parameters())
    assert 0 < result.trainable_params < total / 2 and result.peak_memory_mb > 0
    assert any("locality_loss" in row and "lm_loss" in row for row in result.log)
    with pytest.raises(ValueError, match="unknown locality loss kind 'kl'"):
        finetune.finetune(lm, blocks, ft, kind="kl", weight=1.0, top_k=2)
    with pytest.raises(ValueError, match="locality weight must be >= 0"):
        finetune.finetune(lm, blocks, ft, kind="js", weight=-1.0, top_k=2)
    for layers in ([5], [-1]):
        with pytest.raises(ValueError, match=rf"^layers \[{layers[0]}\] out of range: the model has 2 MoE layers \(0-1\)"):
            finetune.finetune(tiny_moe("qwen2_moe"), blocks, ft, kind="js", weight=1.0, top_k=2, layers=layers)


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_router_kl_trains_only_routers_and_its_anchor_starts_at_zero(arch):
    lm = tiny_moe(arch)
    ids = np.random.default_rng(0).integers(3, 128, size=(8, 16))
    blocks = datasets.Dataset.from_dict({"input_ids": ids, "document_ids": np.zeros_like(ids),
                                         "labels": ids}).with_format("torch")
    anchor = finetune.TrustKL(lm).attach()
    out = lm(input_ids=torch.as_tensor(ids[:2]), output_router_logits=True)
    assert anchor(out.router_logits, {}).item() == pytest.approx(0.0, abs=1e-6)  # the original routing: KL 0
    anchor.detach()
    before = {name: p.clone() for name, p in lm.named_parameters()}
    hooks = sum(len(m._forward_hooks) for m in lm.modules())
    ft = FinetuneConfig(steps=3, batch_size=4, warmup_steps=0, learning_rate=5e-2, lora_rank=4)
    result = finetune.finetune(lm, blocks, ft, kind="js", weight=1.0, top_k=2, method="router_kl",
                               anchor_weight=1.0)
    changed = {name for name, p in result.model.named_parameters() if not torch.equal(p, before[name])}
    routers = {name for name in before if name.endswith(("mlp.gate.weight", "mlp.router.weight", "mlp.router.bias"))}
    assert changed and changed <= routers
    assert result.trainable_params == sum(before[name].numel() for name in routers)
    assert any(row.get("trust_kl", 0) > 0 for row in result.log)
    assert sum(len(m._forward_hooks) for m in result.model.modules()) == hooks  # the anchor's hooks removed
    with pytest.raises(ValueError, match="unknown fine-tuning method 'adapter'"):
        finetune.finetune(lm, blocks, ft, kind="js", weight=1.0, top_k=2, method="adapter")
    with pytest.raises(ValueError, match="layers must be None, got \\[1\\]"):
        finetune.finetune(lm, blocks, ft, kind="js", weight=1.0, top_k=2, method="router_kl", layers=[1])


def test_never_finetunes_on_the_test_or_validation_split():
    for split in ("test", "validation"):
        with pytest.raises(ValueError, match=f"never fine-tune on the '{split}' split"):
            finetune.finetune_blocks(None, 64, split=split)


def test_choice_is_best_validation_ecr_at_the_perplexity_budget():
    sweep = pd.DataFrame({
        "run": ["base", "control", "js@1", "js@3", "l2@1"], "kind": ["none", "none", "js", "js", "l2"],
        "weight": [0.0, 0.0, 1.0, 3.0, 1.0], "seed": [None, 0, 0, 0, 0],
        "val_ppl": [101.0, 100.0, 100.1, 105.0, 101.5], "val_ecr": [0.2, 0.25, 0.30, 0.40, 0.35]})
    # js crosses the budget between 1 and 3: ECR 0.339 there; l2 stays within it with 0.35
    choice = router_design.choose_locality_loss(sweep, 0.02)
    assert (choice["run"], choice["within_budget"], choice["selected_on"]) == ("l2@1", True, "validation")
    assert router_design.match_at_budget(sweep, 0.02).val_ecr_at_budget[0] == pytest.approx(0.30 + 0.1 * 19 / 49)
    over = sweep.assign(val_ppl=[100.0, 100.0, 103.0, 105.0, 104.0])
    fallback = router_design.choose_locality_loss(over, 0.02)
    assert (fallback["run"], fallback["within_budget"], fallback["interpolated"]) == ("js@1", False, False)


def _finetune_cli(args, nproc=1, timeout=600):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + ["-m", "cfmoe.finetune", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_two_process_cpu_ddp_run_completes(smoke_model_dir, tmp_path):
    out = _finetune_cli([str(smoke_model_dir), str(tmp_path), "--preset", "smoke", "--steps", "2"], nproc=2)
    assert "step 2:" in out and "on 2 process(es)" in out
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_training_resumes_from_its_last_checkpoint(smoke_model_dir, tmp_path):
    _finetune_cli([str(smoke_model_dir), str(tmp_path), "--preset", "smoke", "--steps", "2", "--save-every", "2"])
    assert (tmp_path / "checkpoints" / "checkpoint-2").is_dir()
    out = _finetune_cli([str(smoke_model_dir), str(tmp_path), "--preset", "smoke", "--steps", "3",
                         "--save-every", "2", "--resume"])
    assert "resuming from" in out and "checkpoint-2" in out and "step 3:" in out


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    lm = tiny_moe("qwen2_moe")
    ids = np.random.default_rng(0).integers(3, 128, size=(8, 16))
    blocks = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids}).with_format("torch")
    calls = []

    def explodes_on_third_step(router_logits, batch):
        calls.append(1)
        return torch.tensor(float("nan") if len(calls) == 3 else 0.0)

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=5, save_steps=1,
                             per_device_train_batch_size=2, remove_unused_columns=False, disable_tqdm=True)
    trainer = MoETrainer(model=lm, args=args, train_dataset=blocks, top_k=2,
                         extra_losses={"probe": (1.0, explodes_on_third_step)})
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 2: lm_loss=[0-9.]+, probe=nan"):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def _tiny_blocks():
    ids = np.random.default_rng(0).integers(3, 128, size=(8, 16))
    return datasets.Dataset.from_dict({"input_ids": ids, "document_ids": np.zeros_like(ids),
                                       "labels": ids}).with_format("torch")


def _lora_weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_resume_skips_a_half_written_checkpoint(tmp_path, capsys):
    ft = FinetuneConfig(steps=3, batch_size=4, warmup_steps=0, learning_rate=1e-2, lora_rank=4)

    def run(resume):
        return finetune.finetune(tiny_moe("qwen2_moe"), _tiny_blocks(), ft, kind="js", weight=1.0, top_k=2,
                                 output_dir=str(tmp_path), save_every=1, resume=resume).model

    uninterrupted = _lora_weights(run(resume=False))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    (tmp_path / "checkpoint-3" / "trainer_state.json").unlink()  # killed while saving its last file
    capsys.readouterr()
    resumed = _lora_weights(run(resume=True))
    assert (f"skipping incomplete checkpoint checkpoint-3 (no trainer_state.json); resuming from "
            f"{tmp_path / 'checkpoint-2'}\n") in capsys.readouterr().out
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in resumed)  # bit-identical to no kill
    for step in (1, 2, 3):
        (tmp_path / f"checkpoint-{step}" / "optimizer.pt").unlink()
    assert finetune.last_complete_checkpoint(str(tmp_path)) is None
    assert capsys.readouterr().out == (
        "skipping incomplete checkpoints checkpoint-3 (no optimizer.pt), checkpoint-2 (no optimizer.pt), "
        f"checkpoint-1 (no optimizer.pt); no complete checkpoint in {tmp_path}; starting from scratch\n")


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--steps", "-1"], "--steps must be >= 1, got -1"),
    (["--weight", "-0.5"], "--weight must be >= 0, got -0.5"),
    (["--save-every", "-2"], "--save-every must be >= 0, got -2"),
    (["--layers", "0,x"], "--layers must be comma-separated integers, got '0,x'"),
    (["--layers", "5"], "layers [5] out of range: the model has 2 MoE layers (0-1)"),
    (["--layers", "-1"], "layers [-1] out of range: the model has 2 MoE layers (0-1)"),
    (["--layers", "1,1"], "layers [1, 1] repeat layer(s) [1]; give each MoE layer once"),
])
def test_cli_rejects_bad_arguments_in_one_line(args, message, tmp_path, monkeypatch, capsys):
    from tiny_models import tiny_tokenizer

    from cfmoe import determinism, model

    monkeypatch.setattr(model, "load_model", lambda *a, **k: (tiny_moe("qwen2_moe"), tiny_tokenizer()))
    monkeypatch.setattr(determinism, "make_deterministic", lambda *a: None)
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(["tiny", str(tmp_path), "--preset", "smoke", *args])
    assert exit_info.value.code == 2 and capsys.readouterr().err == f"python -m cfmoe.finetune: error: {message}\n"


def test_save_finetuned_replaces_the_folder_whole(tmp_path, monkeypatch):
    from tiny_models import tiny_tokenizer

    from cfmoe import daft
    from cfmoe.config import load_config
    from cfmoe.stages import runs

    monkeypatch.setenv("CFMOE_ARTIFACTS", str(tmp_path))
    cfg = load_config("smoke")
    tokenizer = tiny_tokenizer()
    tuned = daft.lora_model(tiny_moe("qwen2_moe", n_experts=8, top_k=2, n_layers=2), None, rank=4)
    merged = runs.save_finetuned(cfg, "cfmoe", tuned, tokenizer)
    out = runs.finetuned_dir(cfg, "cfmoe")
    assert isinstance(merged, torch.nn.Module) and not hasattr(merged, "merge_and_unload")
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "merged"]
    assert out == tmp_path / "smoke" / "finetune" / "cfmoe" / f"seed{cfg.finetune.seeds[0]}"  # the primary seed
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no .partial left behind
    saved = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert any(p.name == "config.json" for p in saved) and any(p.name == "adapter_config.json" for p in saved)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", killed)
    tuned = daft.lora_model(tiny_moe("qwen2_moe", seed=1), None, rank=4)
    with pytest.raises(KeyboardInterrupt):
        runs.save_finetuned(cfg, "cfmoe", tuned, tokenizer)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == saved  # intact
