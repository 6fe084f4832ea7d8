"""GRPO: the math (advantages, clipped ratio, k3, aggregations) and a micro end-to-end run."""

import math

import pytest
import torch

from daulat.config import read_preset
from daulat.model import DeepseekV3, ModelConfig
from daulat.train.grpo import (
    aggregate, clipped_surrogate, completion_logprobs, group_advantages, k3_kl, overlong_penalty,
)


def micro_model(seed=0):
    torch.manual_seed(seed)
    return DeepseekV3(ModelConfig(**read_preset("micro")["model"]))


# ------------------------------------------------------------------------------------------ the math


def test_aggregations_match_hand_computed_values():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 5.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert aggregate(per_token, mask, "token").item() == pytest.approx((1 + 2 + 3 + 4 + 5) / 5)  # 3.0
    assert aggregate(per_token, mask, "sequence").item() == pytest.approx(((1 + 2 + 3) / 3 + (4 + 5) / 2) / 2)  # 3.25
    assert aggregate(per_token, mask, "constant", max_tokens=4).item() == pytest.approx(15 / (2 * 4))  # 1.875
    # a sequence with nothing counted does not dilute the sequence mean
    mask3 = torch.cat([mask, torch.zeros(1, 4, dtype=torch.long)])
    per3 = torch.cat([per_token, torch.full((1, 4), 7.0)])
    assert aggregate(per3, mask3, "sequence").item() == pytest.approx(3.25)
    assert aggregate(per3, torch.zeros_like(mask3), "token").item() == 0.0
    with pytest.raises(ValueError):
        aggregate(per_token, mask, "mean")


def test_group_advantages():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    none = group_advantages(rewards, "none")
    assert torch.allclose(none, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [-0.75, -0.75, -0.75, 2.25]]))
    group = group_advantages(rewards, "group")
    assert torch.allclose(group[0], none[0] / rewards[0].std(), atol=1e-5)
    assert torch.allclose(group[2], none[2] / rewards[2].std(), atol=1e-5)
    assert group[1].abs().max() == 0  # equal rewards: no signal, and no division by zero
    batch = group_advantages(rewards, "batch")
    assert torch.allclose(batch, none / rewards.std(), atol=1e-5)


def test_k3_is_zero_at_the_reference_and_never_negative():
    torch.manual_seed(0)
    logp = -torch.rand(64, 32) * 10
    assert k3_kl(logp, logp).abs().max() == 0
    for scale in (1e-8, 1e-4, 1.0, 30.0):
        ref = logp + torch.randn_like(logp) * scale
        kl = k3_kl(logp, ref)
        assert (kl >= 0).all() and torch.isfinite(kl).all()
    # the log-ratio is clamped: a token the reference deems impossible costs a bounded amount
    assert k3_kl(torch.tensor([0.0]), torch.tensor([1e4]), clamp=10.0).item() == pytest.approx(math.exp(10) - 10 - 1, rel=1e-5)


def test_clipped_surrogate_clips_only_in_the_direction_of_the_advantage():
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]]))
    loss, ratio, clipped = clipped_surrogate(logp, old, torch.tensor([1.0, -1.0]), 0.2, 0.28)
    assert torch.allclose(ratio, logp.exp())
    # A > 0: min(r, clip(r)) -> 0.5 (unclipped below), 1, 1.28; A < 0: -max(r, clip(r)) -> -0.8, -1, -1.5
    assert torch.allclose(loss, torch.tensor([[-0.5, -1.0, -1.28], [0.8, 1.0, 1.5]]))
    assert clipped.tolist() == [[False, False, True], [True, False, False]]


def test_overlong_penalty():
    lengths = torch.tensor([10, 12, 14, 16, 20])
    assert overlong_penalty(lengths, 16, 0).tolist() == [0, 0, 0, 0, 0]
    assert torch.allclose(overlong_penalty(lengths, 16, 4, 1.0), torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))


# ------------------------------------------------------------------------------------------ with a model


def test_on_policy_ratio_is_exactly_one_without_an_update():
    model = micro_model()
    ids = torch.randint(6, 500, (6, 30))
    model.eval()
    with torch.no_grad():
        old, _ = completion_logprobs(model, ids)
    model.train()
    new, _ = completion_logprobs(model, ids)
    loss, ratio, clipped = clipped_surrogate(new, old, torch.randn(6), 0.2, 0.28)
    assert torch.equal(ratio, torch.ones_like(ratio)) and not clipped.any()


def test_a_group_with_equal_rewards_gives_zero_gradient():
    model = micro_model()
    ids = torch.randint(6, 500, (4, 20))
    mask = torch.zeros(4, 19)
    mask[:, 8:] = 1
    with torch.no_grad():
        old, _ = completion_logprobs(model, ids)
    advantages = group_advantages(torch.full((1, 4), 0.7), "group").flatten()
    for how in ("token", "sequence", "constant"):
        model.zero_grad()
        logp, _ = completion_logprobs(model, ids)
        loss, _, _ = clipped_surrogate(logp, old, advantages, 0.2, 0.28)
        aggregate(loss, mask, how, max_tokens=19).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(g.abs().max() == 0 for g in grads), how


# ------------------------------------------------------------------------------------------ end to end
#
# A task the model can sometimes solve, made in seconds: "Toss a coin." whose right answer is "heads".
# A micro model fine-tuned on conversations answering heads and tails equally often says heads about
# half the time; GRPO must make heads more likely.

PROMPT = "Toss a coin."


@pytest.fixture(scope="module")
def coin(tmp_path_factory):
    import dataclasses
    import json

    from daulat import cli
    from daulat.checkpoint import save_model
    from daulat.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("coin")
    tokenizer = train_tokenizer([f"{PROMPT} Answer: heads", f"{PROMPT} Answer: tails"] * 50, 300)
    config = dataclasses.replace(ModelConfig(**read_preset("micro")["model"]), vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    save_model(DeepseekV3(config), d / "init", tokenizer=tokenizer)
    with open(d / "chats.jsonl", "w") as f:
        for i in range(64):
            messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": f"Answer: {('tails', 'heads')[i % 2]}"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    with open(d / "coin.jsonl", "w") as f:
        f.write(json.dumps({"prompt": PROMPT, "answer": "heads", "split": "train"}) + "\n")
        f.write(json.dumps({"prompt": "Toss a coin!", "answer": "heads", "split": "eval"}) + "\n")
    assert cli.main(["sft", "--init", str(d / "init"), "--data", str(d / "chats.jsonl"), "--out", str(d / "sft"),
                     "--preset", "micro", "--steps", "30", "train.batch_size=16", "train.lr=1e-2", "train.warmup_steps=3",
                     "train.log_every=10", "train.eval_batches=0"]) == 0
    return d


def p_heads(path):
    """Exact probability that the model answers heads rather than tails (teacher-forced, no sampling)."""
    from daulat.checkpoint import load_model
    from daulat.tokenizer import load_tokenizer

    model, tokenizer = load_model(path), load_tokenizer(path)
    prompt = tokenizer.render_chat([{"role": "user", "content": PROMPT}], add_generation_prompt=True)[0]
    p = {}
    for word in ("heads", "tails"):
        ids = prompt + tokenizer.encode(f"Answer: {word}") + [tokenizer.eos_id]
        with torch.no_grad():
            p[word] = completion_logprobs(model, torch.tensor([ids]))[0][0, len(prompt) - 1:].sum().exp().item()
    return p["heads"] / (p["heads"] + p["tails"])


def rollout_source(coin, reward=None, reference=None, **overrides):
    from daulat.checkpoint import load_model
    from daulat.data.tasks import get_task
    from daulat.tokenizer import load_tokenizer
    from daulat.generation import Sampling
    from daulat.train.grpo import GRPOConfig, RolloutSource, load_reward
    from daulat.train.loop import TrainConfig

    settings = dict(prompts_per_rollout=2, group_size=8, eval_problems=0)
    settings.update(overrides)
    cfg = GRPOConfig(sampling=Sampling(max_tokens=settings.pop("max_tokens", 6),
                                       temperature=settings.pop("temperature", 1.0)), **settings)
    train_cfg = TrainConfig(batch_size=8, steps=4)
    model = load_model(coin / "sft" / "final").train()
    source = RolloutSource(model, load_tokenizer(coin / "sft" / "final"), get_task(str(coin / "coin.jsonl")), cfg,
                           train_cfg, reward or load_reward(None, cfg.format_reward),
                           reference=load_model(coin / "sft" / "final") if reference else None)
    return model, source, cfg


def test_on_policy_ratio_is_exactly_one_through_the_rollout_path(coin):
    from daulat.train.grpo import GRPOObjective

    model, source, cfg = rollout_source(coin, epochs=2)  # 4 steps per rollout: old log-probs are recorded
    batch = next(source)
    assert "old_logprobs" in batch and batch["mask"].sum() > 0
    logprobs, _ = completion_logprobs(model, batch["input_ids"])  # the update's forward, with grad
    assert torch.equal(logprobs.detach(), batch["old_logprobs"])
    loss, stats = GRPOObjective(cfg)(model, batch)
    assert stats["clip_frac"] == 0 and stats["kl_rollout"] == 0 and stats["ratio_max"] == 1
    assert stats["engine_logprob_gap"] < 1e-3  # the engine's decode path agrees closely, not bit for bit
    for key in ("reward_mean", "accuracy", "zero_variance_frac", "entropy", "mean_length", "rollout_s", "update_s"):
        assert key in stats


def test_the_policy_is_the_tempered_distribution_the_rollouts_sampled(coin):
    from daulat.train.grpo import GRPOObjective

    model, source, cfg = rollout_source(coin, epochs=2, temperature=0.5, reference=True, beta=0.1)
    batch = next(source)
    mask = batch["mask"].bool()
    tempered, _ = completion_logprobs(model, batch["input_ids"], temperature=0.5)
    raw, _ = completion_logprobs(model, batch["input_ids"])
    assert torch.equal(tempered.detach(), batch["old_logprobs"])  # the old policy is softmax(logits / 0.5)
    assert torch.equal(tempered.detach(), batch["ref_logprobs"])  # ... and so is the (identical) reference
    assert not torch.allclose(tempered[mask], raw[mask])  # ... which is not the raw distribution
    _, stats = GRPOObjective(cfg)(model, batch)
    assert stats["ratio_max"] == 1 and stats["kl_rollout"] == 0 and stats["kl"] == 0  # the same policy throughout
    assert "engine_logprob_gap" not in stats  # the engine reports raw log-probs: no like-for-like gap


def test_zero_variance_groups_are_dropped_and_give_no_gradient(coin):
    from daulat.train.grpo import GRPOObjective

    model, source, cfg = rollout_source(coin, reward=lambda text, example, task: 1.0)  # every answer equal
    batch = next(source)
    assert batch["rollout_stats"]["zero_variance_frac"] == 1 and batch["rollout_stats"]["groups_used"] == 0
    loss, _ = GRPOObjective(cfg)(model, batch)
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters())
    # resampling draws new problems, up to resample_rounds more times
    _, source, _ = rollout_source(coin, reward=lambda text, example, task: 1.0, zero_variance="resample", resample_rounds=2)
    assert next(source)["rollout_stats"]["resample_rounds"] == 2


def test_truncated_samples_are_masked(coin):
    _, source, _ = rollout_source(coin, max_tokens=2, zero_variance="keep")  # no answer fits in 2 tokens
    batch = next(source)
    assert batch["rollout_stats"]["truncated_frac"] == 1 and batch["mask"].sum() == 0
    _, source, _ = rollout_source(coin, max_tokens=2, zero_variance="keep", mask_truncated=False)
    assert next(source)["mask"].sum() > 0


def test_grpo_makes_the_rewarded_answer_more_likely(coin):
    import json

    from daulat import cli
    from daulat.checkpoint import load_info

    before = p_heads(coin / "sft" / "final")
    assert 0.2 < before < 0.8  # the model sometimes solves it
    out = coin / "grpo"
    assert cli.main(["grpo", "--init", str(coin / "sft" / "final"), "--task", str(coin / "coin.jsonl"), "--out", str(out),
                     "--preset", "micro", "--steps", "8", "grpo.prompts_per_rollout=2", "grpo.group_size=8",
                     "train.batch_size=16", "train.lr=3e-3", "train.log_every=1", "grpo.sampling.max_tokens=6",
                     "grpo.eval_problems=1"]) == 0
    after = p_heads(out / "final")
    assert after > before + 0.15, (before, after)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 8 and [r["step"] for r in records if "eval_accuracy" in r] == [0, 8]
    for key in ("reward_mean", "accuracy", "zero_variance_frac", "clip_frac", "entropy", "mean_length", "kl_rollout",
                "rollout_s", "update_s"):
        assert key in steps[-1], key
    assert "kl" not in steps[-1]  # beta = 0: no reference, no KL term
    assert load_info(out / "final")["stage"] == "grpo" and (out / "step-000008").is_dir()


def test_kl_to_the_reference_starts_at_zero(coin):
    import json

    from daulat import cli

    out = coin / "grpo-kl"
    assert cli.main(["grpo", "--init", str(coin / "sft" / "final"), "--task", str(coin / "coin.jsonl"), "--out", str(out),
                     "--preset", "micro", "--steps", "2", "grpo.prompts_per_rollout=2", "grpo.group_size=4",
                     "train.batch_size=8", "train.log_every=1", "grpo.sampling.max_tokens=6", "grpo.eval_problems=0",
                     "grpo.beta=0.1", "grpo.loss_aggregation=sequence"]) == 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[0]["kl"] == 0 and steps[1]["kl"] >= 0
