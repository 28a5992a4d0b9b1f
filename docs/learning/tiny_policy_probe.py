"""How much the random tiny policy's first action distribution depends on its input (3 toy tasks x 8 initial states),
for the old init std (0.02) and the shipped one (1/sqrt(64)), with a random or a smooth action head. No training.

    PYTHONPATH=. .venv/bin/python docs/learning/tiny_policy_probe.py > docs/learning/tiny_policy_probe.txt
"""
import itertools, sys, torch
import trainer.models.config as mc
import trainer.models as models
from trainer.envs.toy import ToyReachEnv
from trainer.build import ModelConfig, QuantConfig, EnvConfig, build_policy
from trainer.models.lora import LoraSettings
from trainer.dist import Dist, DistConfig

torch.set_num_threads(1)
dist = Dist.create(DistConfig())
env = ToyReachEnv()
obs = [env.reset(t, s, seed=s) for t, s in itertools.product(range(env.num_tasks()), range(8))]
for label, std, smooth in [("std 0.02, random head", 0.02, False), ("std 0.02, smooth head", 0.02, True),
                           ("std 1/8, random head", 0.125, False), ("std 1/8, smooth head (shipped)", 0.125, True)]:
    mc.TINY_INIT_STD = std
    saved = models.smooth_action_rows
    if not smooth:
        models.smooth_action_rows = lambda model, seed: None
    policy = build_policy(ModelConfig(source="tiny"), LoraSettings(enabled=True, rank=16, alpha=32), QuantConfig(),
                          EnvConfig(suite="toy"), dist, value_head=False, seed=0)
    models.smooth_action_rows = saved
    policy.eval()
    inputs = policy.prepare(obs)
    with torch.no_grad():
        out = policy(inputs.to(policy.device), use_cache=False)
    logits = out.action_logits[:, -1].float()  # first action token's logits [N, 256]
    probs = logits.softmax(-1)
    entropy = float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())
    spread = float((logits - logits.mean(0)).norm(dim=-1).mean() / logits.norm(dim=-1).mean())
    greedy = logits.argmax(-1)
    tv = float(0.5 * (probs[:, None] - probs[None]).abs().sum(-1).mean())
    print(f"{label:32s} first-token entropy {entropy:.2f} (ln 256 = 5.55) | logit spread over inputs "
          f"{spread:.3f} of norm | mean pairwise TV of pi(a|s) {tv:.3f} | distinct greedy bins {len(set(greedy.tolist()))}/{len(obs)}")
