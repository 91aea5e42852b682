# SSIM/PSNR along v3's stage 1b: the first 2 videos of each held-out split, 12 frames, model only (CFG 3.5).
for c in stage1/snapshots/step_001000 stage1/snapshots/step_001500 stage1/snapshots/step_002000 stage1/snapshots/step_002500 stage1/snapshots/step_003000 stage1/snapshots/step_003500 stage1/model stage2/model; do
  n=$(echo $c | tr '/' '_')
  aa-trt eval --ckpt runs4/$c.safetensors --data data/synth128 --videos 2 --frames 12 --no-baselines --quiet -o runs4/curve_$n.json
done
