# A model with the shape of the one in SRC (config.json + tokenizer files) and random weights,
# written as safetensors to DST: decode speed does not depend on the weights' values.
import os, shutil, sys, time
import torch
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = sys.argv[1], sys.argv[2]
t = time.time()
cfg = AutoConfig.from_pretrained(src)
torch.manual_seed(0)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(cfg)
model.save_pretrained(dst, safe_serialization=True)
for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
    shutil.copy(os.path.join(src, f), dst)
n = sum(p.numel() for p in model.parameters())
print(f"{dst}: {n/1e6:.0f}M parameters, {time.time()-t:.1f}s", flush=True)
