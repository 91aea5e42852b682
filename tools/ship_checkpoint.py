"""Store a trained checkpoint as the embedded default: fp16 weights, and optionally the CFG scale the
model declares (config.guidance, chosen on the training split; docs/training.md).

    python tools/ship_checkpoint.py SRC DST [--guidance G]
"""
import argparse
import json
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="the trained checkpoint (model.safetensors of `aa-trt train`)")
    p.add_argument("dst", help="where to write the fp16 file")
    p.add_argument("--guidance", type=float, default=None, help="the CFG scale the file declares")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    import torch  # after parsing: --help stays instant

    from aa_trt.checkpoint import load_checkpoint, read_metadata, save_models

    prov = json.loads(read_metadata(a.src)["provenance"])
    prov["stored_as"] = "float16 (trained in float32; aa-trt loads it back in the run's dtype)"
    models = load_checkpoint(a.src, dtype=torch.float32)
    if a.guidance is not None:
        models.config = models.config.replace(guidance=a.guidance)
        prov["guidance"] = f"{a.guidance}: the best SSIM of a CFG sweep on the training split (docs/training.md)"
    save_models(a.dst, models, dtype=torch.float16, provenance=prov)
    print(f"{a.dst}: {a.src} in fp16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
