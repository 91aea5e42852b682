import json, sys, torch
from aa_trt.checkpoint import load_checkpoint, read_metadata, save_models
src, dst = sys.argv[1:3]
prov = json.loads(read_metadata(src)["provenance"])
prov["stored_as"] = "float16 (trained in float32; aa-trt loads it back in the run's dtype)"
save_models(dst, load_checkpoint(src, dtype=torch.float32), dtype=torch.float16, provenance=prov)
