# After v2 (2026-11-26): a longer stage 0 continuing v2's VAE and CLIP (the UNets, PoseGuider and
# motion modules carry over unchanged), then stage 1 continuing v2's UNets on the new latents.
# Runs in /work/runs4 on 2 shared CPU cores; not shipped.
aa-trt train --stage 0 --init runs3/stage2/model.safetensors --data data/synth128 --out runs4/stage0 --steps 4000 --batch 8 --lr 4e-4 --log-every 20
aa-trt eval --ckpt runs4/stage0/model.safetensors --data data/synth128 --videos 6 --frames 24 --ceiling --no-model -o eval_stage0_ceiling.json
aa-trt train --stage 1 --init runs4/stage0/model.safetensors --data data/synth128 --out runs4/stage1 --steps 8000 --batch 8 --lr 2e-4 --warmup 100 --lr-decay cosine --snapshot-every 500 --save-every 250 --log-every 10
