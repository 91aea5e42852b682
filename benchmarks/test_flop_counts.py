"""FLOPs of one DDIM step over a 24-frame window with CFG at the design size (512x784), sd15 widths,
counted with torch.utils.flop_counter on the meta device (the real code path and shapes, nothing
allocated), aa-trt against the Moore-style baseline. No timing: these are counts."""
import pytest

from aa_trt.config import PRESETS
from aa_trt.pipeline import Animator

from .flops import attention_share, count_flops
from .workloads import step_pair, unet_models

SIZES = [(512, 512), (512, 784), (768, 768)]  # width x height


@pytest.fixture(scope="module")
def meta_sd15():
    return Animator(unet_models(PRESETS["sd15"], "meta"), device="meta")


@pytest.mark.parametrize("width,height", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_step_flops_at_design_sizes(meta_sd15, width, height, record):
    pair = step_pair(meta_sd15, frames=24, height=height, width=width)
    (ours, ours_ops), (moore, moore_ops) = count_flops(pair.ours), count_flops(pair.moore)
    assert moore > ours > 0  # the baseline does the work we removed, and only that on top
    info = dict(pair.params, flops_by_op=ours_ops, baseline_flops_by_op=moore_ops,
                attention_flops=attention_share(ours_ops),
                baseline_attention_flops=attention_share(moore_ops))
    record(f"FLOPs per step, 24-frame window, CFG, sd15, {width}x{height}", ours, "FLOP", baseline=moore,
           ratio=moore / ours, ratio_of="baseline / aa-trt: x less work", details=info)
