"""Writes the fuzz seeds beside this file: small real files of every kind aa-trt reads from a user
(python tests/fuzz_seeds/make_seeds.py). The seeds are committed; this script says how they were
made and remakes them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main() -> None:
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from aa_trt.checkpoint import FORMAT, FORMAT_VERSION
    from aa_trt.config import PRESETS
    from aa_trt.pose.keypoints import Pose, save_poses
    from aa_trt.resume import ResumeState
    from media import make_reference, make_video, stick_frames

    make_reference(HERE / "ref.png", (24, 32))
    Image.open(HERE / "ref.png").convert("RGBA").save(HERE / "ref_alpha.png")
    Image.open(HERE / "ref.png").save(HERE / "ref.jpg", quality=80)
    make_video(HERE / "dance.mp4", stick_frames(3, (32, 32)), fps=10, audio=False)
    frames = [Image.fromarray(f) for f in stick_frames(3, (16, 16))]
    frames[0].save(HERE / "dance.gif", save_all=True, append_images=frames[1:], duration=100)

    kps = np.zeros((128, 3), np.float32)
    kps[:18] = np.c_[np.linspace(0.2, 0.8, 18), np.linspace(0.1, 0.9, 18), np.ones(18)]
    save_poses(HERE / "poses.npz", [Pose.from_array(kps, 32, 32), None], 32, 32)

    cfg = PRESETS["tiny"].to_dict()
    save_file({"vae.encoder.conv_in.weight": torch.zeros(2, 3, 1, 1)}, str(HERE / "model.safetensors"),
              metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": json.dumps(cfg)})
    torch.save({"conv_in.weight": torch.zeros(2, 3, 1, 1), "conv_in.bias": torch.zeros(2)}, HERE / "pose_guider.pth")

    ident = {"checkpoint": "0" * 64, "ref": "1" * 64, "driving": "2" * 64, "size": [32, 32],
             "sampling options": {"seed": 7, "steps": 2}}
    state = ResumeState(HERE / "out.mp4", ident)
    state.path = HERE / "resume.safetensors"
    state.save({"i": 0, "x": torch.zeros(1, 4, 2, 4, 4), "carry": {"prev": torch.ones(1, 4, 2, 4, 4)}})
    (HERE / "resume_identity.json").write_text(json.dumps(ident, sort_keys=True) + "\n")

    (HERE / "jobs.jsonl").write_text(
        "# two jobs\n"
        '{"ref": "ref.png", "driving": "dance.mp4", "output": "a.mp4", "steps": 2, "seed": 1}\n'
        '{"ref": "ref.png", "driving": "dance.mp4", "output": "b", "png": true, "pose_video": true, '
        '"context-frames": 8, "guidance": 2.5, "sampler": "dpmpp_2m"}\n')

    np.savez(HERE / "video.npz", frames=np.zeros((2, 16, 16, 3), np.uint8), poses=np.zeros((2, 16, 16, 3), np.uint8),
             keypoints=np.repeat(kps[None], 2, 0))
    (HERE / "train.json").write_text(json.dumps([{"npz_path": "video.npz"}]) + "\n")

    (HERE / "manifest.json").write_text(json.dumps({
        "format": "aa-trt-engines", "format_version": 1, "aa_trt_version": "0.1.0", "complete": True,
        "checkpoint": {"sha256": "0" * 64, "path": "model.safetensors"},
        "graphs": {"clip": {"files": {"clip.onnx": 4}, "key": {"opset": 17}}},
        "shapes": {"height": 32, "width": 32, "frames": 4, "windows": 1}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
