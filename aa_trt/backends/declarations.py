"""The tensor names of every graph of an `aa-trt build`: the one declaration that the exporter
(aa_trt.export.graphs, which builds the graphs from it) and the runtimes (which bind every tensor by
name, never by position, and refuse a build whose recorded names differ) both read. It lives with
the runtimes so that running a build never imports the exporter.

The K/V cache (kv_name: k0, v0, k1, v1, ...) follows the declared inputs of unet_cond and is the
output of reference_kv.
"""
from __future__ import annotations

GRAPHS = ("clip", "vae_encoder", "vae_decoder", "pose_guider", "reference_kv", "unet_cond",
          "unet_uncond")
UNET_INPUTS = ("latents", "timestep", "pose", "context")
INPUTS = {"clip": ("pixel_values",), "vae_encoder": ("image",), "vae_decoder": ("latents",),
          "pose_guider": ("frames",), "reference_kv": ("ref_latent", "context"),
          "unet_cond": UNET_INPUTS, "unet_uncond": UNET_INPUTS}
OUTPUTS = {"clip": ("image_embeds",), "vae_encoder": ("latent",), "vae_decoder": ("image",),
           "pose_guider": ("features",), "reference_kv": (), "unet_cond": ("prediction",),
           "unet_uncond": ("prediction",)}
KV_INPUTS, KV_OUTPUTS = ("unet_cond",), ("reference_kv",)
# In every graph's key: bumped when the exported computation changes for the same weights and
# names, so that older graphs are exported again. 2: the UNet's timestep embedding takes sin/cos
# before any reshape of the timestep (models.layers.timestep_embedding). 3: the cross-attention of
# a one-token context is to_out(to_v(context)) (TransformerBlock.cross_attention). 4: GEGLU's
# projection is two GEMMs (value, gate) instead of one split in two (models.layers.GEGLU).
GRAPH_REVISION = 4


def kv_name(kind: str, block: int) -> str:
    """The K/V cache's tensor names: k0, v0, k1, v1, ... (reference_kv's outputs, unet_cond's inputs)."""
    return f"{kind}{block}"


def declared_names(graph: str, n_kv: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(input names, output names) of one graph of a model with `n_kv` transformer blocks."""
    kv = tuple(kv_name(kind, i) for i in range(n_kv) for kind in ("k", "v"))
    return (INPUTS[graph] + (kv if graph in KV_INPUTS else ()),
            OUTPUTS[graph] + (kv if graph in KV_OUTPUTS else ()))
