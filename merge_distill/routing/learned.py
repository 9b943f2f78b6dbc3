"""Learned router: a small gate on the student's hidden state picks the teachers per token.

    z = gate(h)  with h = student's last hidden state [B, T, H] (detached), z [B, T, K]
    w_k = softmax_k(z)

Objective (aux_loss): make the blended target explain the data. For the mixture blend
p = sum_k w_k p_k, the likelihood of the gold token y is sum_k w_k p_k(y), so

    aux_loss = - sum_{valid tokens} log sum_k w_k p_k(y)
             = - sum_{valid tokens} logsumexp_k(log w_k - NLL_k)

computed in log space (log_softmax + logsumexp) so that no small p_k(y) underflows. Its
gradient w.r.t. z_k is w_k - r_k with r_k = w_k p_k(y) / sum_j w_j p_j(y): the gate moves
towards the teachers that, in hindsight, explained the token (an EM-style responsibility).
The objective uses the gate's own softmax, before top_k / floor, and is the mixture
likelihood whichever blend the recipe uses. It returns a sum; the engine divides by the
number of valid tokens and steps a separate optimizer with `routing.lr` on router.parameters().

The gate's last layer starts at zero, so training starts from uniform weights.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from merge_distill.routing.base import Router, RouterConfigBase, RouterInputs
from merge_distill.routing.registry import ROUTERS


class LearnedRouterConfig(RouterConfigBase):
    kind: Literal["learned"] = Field("learned", description="A gate trained on the student's hidden state.")
    gate: Literal["linear", "mlp"] = Field(
        "linear", description="linear: z = W h + b; mlp: z = W2 gelu(W1 h + b1) + b2."
    )
    hidden: int = Field(64, ge=1, description="Width of the MLP gate's hidden layer (gate: mlp only).")
    lr: float = Field(1e-3, gt=0.0, description="Learning rate of the gate's own optimizer.")


@ROUTERS.register("learned", LearnedRouterConfig, "w = softmax(gate(student hidden)), gate trained to maximise the mixture likelihood of the gold token")
class LearnedRouter(Router):
    needs = frozenset({"gold_nll", "hidden"})

    def __init__(self, config: LearnedRouterConfig, teacher_names: list[str], hidden_size: int):
        super().__init__(config, teacher_names, hidden_size)
        K = self.num_teachers
        if config.gate == "linear":
            last = nn.Linear(hidden_size, K)
            self.gate: nn.Module = last
        else:
            last = nn.Linear(config.hidden, K)
            self.gate = nn.Sequential(nn.Linear(hidden_size, config.hidden), nn.GELU(), last)
        # Zero last layer: logits are 0 for every input, so the gate starts at w_k = 1/K and the
        # first steps move away from the uniform blend rather than from a random one.
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def gate_log_weights(self, inputs: RouterInputs) -> Tensor:
        """hidden [B, T, H] -> log w [B, T, K] float32 (log_softmax of the gate's logits)."""
        if inputs.hidden is None:
            raise ValueError("the learned router needs the student's hidden states (RouterInputs.hidden is None)")
        param = next(self.gate.parameters())
        hidden = inputs.hidden.detach().to(device=param.device, dtype=param.dtype)
        return torch.log_softmax(self.gate(hidden).float(), dim=-1)

    def raw_weights(self, inputs: RouterInputs) -> Tensor:
        """-> [B, T, K] float32 = softmax(gate(hidden))."""
        return self.gate_log_weights(inputs).exp()

    def aux_loss(self, inputs: RouterInputs) -> Tensor:
        """-sum over valid tokens of log sum_k w_k p_k(gold): a scalar with grad into the gate."""
        log_w = self.gate_log_weights(inputs)                                      # [B, T, K]
        nll = inputs.gold_nll.detach().float().to(log_w.device)                    # [B, T, K]
        log_mix = torch.logsumexp(log_w - nll, dim=-1)                             # [B, T]
        mask = inputs.mask.to(log_mix.device)
        return -torch.where(mask, log_mix, torch.zeros_like(log_mix)).sum()
