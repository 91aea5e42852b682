for c in stage1/snapshots/step_000400 stage1/snapshots/step_001000 stage1/snapshots/step_001600 stage2/model; do
  n=$(echo $c | tr '/' '_')
  aa-trt eval --ckpt runs/$c.safetensors --data data/synth128 --videos 2 --frames 12 --no-baselines --quiet -o runs/curve_$n.json
done
