# SSIM/PSNR along v6's stage 1e: the first 2 videos of each held-out split, 12 frames, model only, CFG 3.5
# (v3's and v4's curves, v3/curve/ and v4/curve/, used the same sample and scale).
for c in snapshots/step_009000 snapshots/step_011000 snapshots/step_012000 model; do
  n=$(echo $c | tr '/' '_')
  aa-trt eval --ckpt runs7/stage1/$c.safetensors --data data/synth128 --videos 2 --frames 12 --no-baselines --guidance 3.5 --quiet -o curve_stage1_$n.json
done
