# SSIM/PSNR along v7's stage 1f: the first 2 videos of each held-out split, 12 frames, model only, CFG 3.5
# (v3's to v6's curves, v*/curve/, used the same sample and scale). Stage-1 checkpoints carry v3's decoder.
for c in snapshots/step_013000 snapshots/step_013500 snapshots/step_014000 model; do
  n=$(echo $c | tr '/' '_')
  aa-trt eval --ckpt runs8/stage1/$c.safetensors --data data/synth128 --videos 2 --frames 12 --no-baselines --guidance 3.5 --quiet -o curve_stage1_$n.json
done
