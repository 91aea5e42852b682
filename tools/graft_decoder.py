"""Give one checkpoint another's fine-tuned VAE decoder, so that a decoder fine-tune carries over to
new denoising networks instead of starting again from the stage-0 decoder.

    python tools/graft_decoder.py BASE DECODER_SRC DST

BASE supplies everything but the decoder (UNets, PoseGuider, CLIP, VAE encoder, config); DECODER_SRC
supplies post_quant_conv and the decoder. A decoder only fits the encoder it was trained on, so the
two files must hold the same encoder, quant_conv and latent_scale, bit for bit, or nothing is written.
DST's provenance is BASE's, with DECODER_SRC's `decoder_finetune` record.
"""
import argparse
import json
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", help="checkpoint giving everything but the decoder")
    p.add_argument("decoder_src", help="checkpoint giving the fine-tuned decoder (same encoder)")
    p.add_argument("dst", help="where to write the result")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    import torch

    from aa_trt.checkpoint import load_checkpoint, read_metadata, save_models

    base = load_checkpoint(a.base, dtype=torch.float32)
    src = load_checkpoint(a.decoder_src, dtype=torch.float32, components=("vae",))
    if base.config.vae != src.config.vae or base.config.latent_scale != src.config.latent_scale:
        sys.exit(f"{a.decoder_src}: its VAE config or latent_scale differs from {a.base}'s")
    b_sd, s_sd = base.vae.state_dict(), src.vae.state_dict()
    latent_side = [k for k in b_sd if not k.startswith(("decoder.", "post_quant_conv."))]
    differ = [k for k in latent_side if not torch.equal(b_sd[k], s_sd[k])]
    if differ:
        sys.exit(f"{a.decoder_src}: its VAE encoder differs from {a.base}'s ({differ[0]} and {len(differ) - 1} more);"
                 " its decoder would not fit these latents")
    src_prov = json.loads(read_metadata(a.decoder_src)["provenance"])
    if "decoder_finetune" not in src_prov:
        sys.exit(f"{a.decoder_src}: no decoder_finetune record; nothing to graft")
    graft = {k: v for k, v in s_sd.items() if k not in latent_side}
    base.vae.load_state_dict({**b_sd, **graft})
    prov = json.loads(read_metadata(a.base)["provenance"])
    prov["decoder_finetune"] = src_prov["decoder_finetune"]
    save_models(a.dst, base, provenance=prov)
    print(f"{a.dst}: {a.base} with the decoder of {a.decoder_src} ({len(graft)} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
