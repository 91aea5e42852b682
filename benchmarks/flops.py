"""FLOP counting for the benchmarks: the product's own counter (aa_trt.flop_count), which adds the
CPU SDPA kernel that torch.utils.flop_counter leaves uncounted."""
from aa_trt.flop_count import CUSTOM, attention_share, count_flops  # noqa: F401
