"""DPO's implicit reward, computed from plain logits (independently of TRL's fused log-probability head).

For a policy pi_theta = pi_0 + LoRA with reference pi_0, the implicit reward of a completion y is
``r(x, y) = beta * (log pi_theta(y | x) - log pi_0(y | x))`` where ``log pi(y | x) = sum_t log pi(y_t | x, y_<t)``
over the completion tokens; TRL logs its batch means as ``rewards/chosen`` and ``rewards/rejected``.
"""

from __future__ import annotations

import torch

NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")


def completion_logps(model, batch: dict) -> torch.Tensor:
    """``sum_t completion_mask[b, t] * log p(input_ids[b, t] | input_ids[b, :t])`` per row, from full logits."""
    inputs = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
    logits = model(**inputs, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = batch["input_ids"][:, 1:]
    token_logp = logp.gather(-1, target[..., None])[..., 0]
    mask = batch["completion_mask"][:, 1:].to(token_logp.dtype)
    return (token_logp * mask).sum(dim=1)


@torch.no_grad()
def implicit_rewards(peft_model, batch: dict, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen rewards, rejected rewards) of a collated DPO batch (first half chosen, second half rejected), with
    the reference obtained by disabling the adapter."""
    policy = completion_logps(peft_model, batch)
    with peft_model.disable_adapter():
        reference = completion_logps(peft_model, batch)
    rewards = beta * (policy - reference)
    return rewards.chunk(2, dim=0)


def dpo_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """The sigmoid DPO loss ``-log sigmoid(r_chosen - r_rejected)``, per pair (log 2 when both rewards are 0)."""
    return -torch.nn.functional.logsigmoid(chosen_rewards - rejected_rewards)
