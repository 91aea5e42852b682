# SSIM/PSNR along v4's stage 1c: the first 2 videos of each held-out split, 12 frames, model only, CFG 3.5
# (v3's curve, v3/curve/, used the same sample and scale).
for c in snapshots/step_001000 snapshots/step_002000 snapshots/step_003000 model; do
  n=$(echo $c | tr '/' '_')
  aa-trt eval --ckpt runs5/stage1/$c.safetensors --data data/synth128 --videos 2 --frames 12 --no-baselines --guidance 3.5 --quiet -o curve_stage1_$n.json
done
