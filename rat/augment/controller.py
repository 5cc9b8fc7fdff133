"""The Adversarial AutoAugment controller: an LSTM that samples policies of a :class:`rat.augment.policy.PolicySpace`
token by token (and scores given ones, for REINFORCE)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["PolicyController"]


class PolicyController(nn.Module):
    """The policy network: a one-layer LSTM that emits, token by token, each operation's type then its magnitude.

    Each decision feeds the embedding of the previous token to the LSTM cell; two linear heads (zero-initialised,
    so a new controller is exactly uniform) give the logits over op types and magnitudes. Every ``reset_every``
    decisions the LSTM state returns to zero and the start token is fed again: ``reset_every`` = ops per sub-policy
    samples each sub-policy from a fresh state (the seed implementation's rule, which its README gives as the fix
    for a drift towards extreme augmentations), ``None`` carries one state through the whole policy.

    Args:
        num_ops: number of op types.
        num_magnitudes: number of magnitude levels.
        num_decisions: operations per policy (sub-policies × ops per sub-policy).
        hidden_size: LSTM width (the paper: 100).
        reset_every: decisions between resets of the LSTM state (``None``: only at the start of a policy).
    """

    def __init__(self, num_ops: int, num_magnitudes: int, num_decisions: int, hidden_size: int = 100,
                 reset_every: int | None = None):
        super().__init__()
        self.num_ops, self.num_magnitudes, self.num_decisions = num_ops, num_magnitudes, num_decisions
        self.reset_every = reset_every or num_decisions
        self.embed = nn.Embedding(1 + num_ops + num_magnitudes, hidden_size)  # token 0 starts the sequence
        self.cell = nn.LSTMCell(hidden_size, hidden_size)
        self.op_head = nn.Linear(hidden_size, num_ops)
        self.magnitude_head = nn.Linear(hidden_size, num_magnitudes)
        for head in (self.op_head, self.magnitude_head):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, num_policies: int = 1, tokens: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Sample ``num_policies`` policies (``tokens=None``, drawing from ``generator``) or score given ``tokens``.

        Returns:
            ``tokens`` (M, D, 2) int64 (op index, magnitude index per decision), ``log_prob`` (M,) and ``entropy``
            (M,) summed over the 2·D choices, and ``op_probs`` (num_ops,) / ``magnitude_probs`` (num_magnitudes,):
            the controller's choice probabilities averaged over decisions and policies.
        """
        m = num_policies if tokens is None else tokens.shape[0]
        device = self.embed.weight.device
        hidden = torch.zeros(m, self.cell.hidden_size, device=device)
        start = torch.zeros(m, dtype=torch.int64, device=device)
        chosen, log_prob, entropy, probs = [], 0.0, 0.0, ([], [])
        offsets = (1, 1 + self.num_ops)
        for d in range(self.num_decisions):
            if d % self.reset_every == 0:
                state, previous = (hidden, hidden), start
            pair = []
            for kind, head in enumerate((self.op_head, self.magnitude_head)):
                state = self.cell(self.embed(previous), state)
                logits = head(state[0])
                logp = torch.log_softmax(logits, dim=1)
                p = logp.exp()
                if tokens is None:
                    choice = torch.multinomial(p.detach().cpu(), 1, generator=generator).flatten().to(device)
                else:
                    choice = tokens[:, d, kind].to(device)
                log_prob = log_prob + logp.gather(1, choice[:, None]).squeeze(1)
                entropy = entropy - (p * logp).sum(dim=1)
                probs[kind].append(p)
                pair.append(choice)
                previous = choice + offsets[kind]
            chosen.append(torch.stack(pair, dim=1))
        return {"tokens": torch.stack(chosen, dim=1), "log_prob": log_prob, "entropy": entropy,
                "op_probs": torch.stack(probs[0]).mean(dim=(0, 1)),
                "magnitude_probs": torch.stack(probs[1]).mean(dim=(0, 1))}

