"""Profile one `VLAPolicy.act` call of full-size OpenVLA (random weights) at a given batch on the GPU: wall time, GPU
kernel time by kind, and the top CPU / GPU ops. Usage: python scripts/profile_act.py OUT.json [batch] [preset]"""

import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from trainer.bench import _observations, _sync, kernel_time_by_kind, timed
from trainer.models import EnvSettings, VLAPolicy, load_model_and_tokenizer

out, batch = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 16
preset = sys.argv[3] if len(sys.argv) > 3 else "openvla-7b"
model, tokenizer = load_model_and_tokenizer(f"random:{preset}", seed=0, dtype=torch.bfloat16, device="cuda")
policy = VLAPolicy(model, tokenizer, EnvSettings("libero", True, "libero_spatial")).cuda().eval()
inputs = policy.prepare(_observations(batch))
seconds = timed(lambda: policy.act(inputs, greedy=False), warmup=2, iters=5)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    start = time.perf_counter()
    policy.act(inputs, greedy=False)
    _sync()
    wall = time.perf_counter() - start
kernels = kernel_time_by_kind(prof)
report = {"preset": preset, "batch": batch, "device": torch.cuda.get_device_name(0), "seconds_per_act": seconds,
          "profiled_wall": wall, "gpu_busy": sum(kernels.values()), "gpu_idle_share": 1 - sum(kernels.values()) / wall,
          "kernels": kernels, "top_cpu_ops": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15),
          "top_ops": prof.key_averages().table(sort_by="self_device_time_total", row_limit=15)}
json.dump(report, open(out, "w"), indent=1)
print({k: v for k, v in report.items() if not k.startswith("top")})
