"""Why the shipped configs learn from some seeds and not others: how much the random tiny policy's action
distribution at the first step depends on the INSTRUCTION (the same initial state, the three tasks) and on the
initial state (the same task, 8 states), per seed, with the shipped init. No training.

    PYTHONPATH=. .venv/bin/python docs/learning/seed_probe.py > docs/learning/seed_probe.txt

Per seed: the mean total-variation distance between pi(first token | s) for two instructions at the same state, the
same for two states under the same instruction, and, per task, the probability that the first step's dx and dy
(the first action token's bin sign) points towards that task's target; and the coefficient of the action value v in
a least-squares fit of each input's logits on the smooth rows' basis (its mean is the part every input shares).
"""
import itertools

import numpy as np
import torch

from trainer.build import EnvConfig, ModelConfig, QuantConfig, build_policy
from trainer.dist import Dist, DistConfig
from trainer.envs.toy import TARGET_POSITIONS, ToyReachEnv
from trainer.models import smooth_row_basis
from trainer.models.lora import LoraSettings

torch.set_num_threads(1)
dist = Dist.create(DistConfig())
env = ToyReachEnv()
tasks, states = range(env.num_tasks()), range(8)
obs = [env.reset(t, s, seed=s) for t, s in itertools.product(tasks, states)]
for seed in (0, 1, 2):
    policy = build_policy(ModelConfig(source="tiny"), LoraSettings(enabled=True, rank=16, alpha=32), QuantConfig(),
                          EnvConfig(suite="toy"), dist, value_head=False, seed=seed)
    policy.eval()
    with torch.no_grad():
        out = policy(policy.prepare(obs).to(policy.device), use_cache=False)
    logits = out.action_logits[:, -1].float()  # [task x state, 256]
    probs = logits.softmax(-1).view(len(tasks), len(states), -1)  # [task, state, 256]
    tv = lambda a, b: float(0.5 * (a - b).abs().sum(-1).mean())
    across_instructions = np.mean([tv(probs[i], probs[j]) for i, j in itertools.combinations(tasks, 2)])
    across_states = np.mean([tv(probs[:, i], probs[:, j]) for i, j in itertools.combinations(states, 2)])
    # dx is the first action token. Its 256 logits are in vocabulary order, and OpenVLA's action ids count DOWN the
    # bins (id = vocab - 1 - bin): logit 0 is the largest dx, logit 255 the smallest. P(dx has the target's sign):
    toward = []
    for t in tasks:
        positive = probs[t, :, :128].sum(-1).mean()
        toward.append(float(positive if TARGET_POSITIONS[t][0] > 0 else 1 - positive))
    # The smooth action rows' basis in the action value v (smooth_action_rows): fit each input's logits on it; the
    # coefficient of v is the term that tilts the distribution towards one sign of dx.
    basis = smooth_row_basis(policy.config)  # column 0 is v
    with_constant = torch.cat([torch.ones(len(basis), 1), basis], dim=1)
    linear = torch.linalg.lstsq(with_constant, logits.T).solution[1]  # [inputs]
    print(f"seed {seed}: coefficient of v in the logits: mean over inputs {float(linear.mean()):+.3f}, "
          f"sd over inputs {float(linear.std()):.3f}")
    print(f"seed {seed}: TV across instructions {across_instructions:.4f} | across initial states {across_states:.4f} "
          f"| P(first dx towards the target) per task " + " ".join(f"{p:.2f}" for p in toward))
