# The embedded default model (v3), as it was made (2 shared CPU cores, torch 2.13 cpu). Wall times: docs/training.md.
# v3 continues v2: first run v2's commands (docs/training/v2/commands.sh: data, stage 0, stage 1, stage 2);
# runs3/stage2/model.safetensors below is v2's stage-2 output in fp32 (runs/stage2 in v2's file).
# The first default model (v1, 4 latent channels) and its record: docs/training/v1/.
aa-trt train --stage 0 --init runs3/stage2/model.safetensors --data data/synth128 --out runs4/stage0 --steps 4000 --batch 8 --lr 4e-4 --log-every 20
aa-trt eval --ckpt runs4/stage0/model.safetensors --data data/synth128 --videos 6 --frames 24 --ceiling --no-model -o eval_stage0_ceiling.json
# Stage 1 on the new latents, continuing v2's UNets. Started with a cosine over 8000 steps; stopped at
# step 560 (session end) and resumed from the step-500 state with --steps 4500, then stopped at step 2510
# and resumed from the step-2500 state with --steps 3800 (time), so the cosine was shortened twice
# (LR 1.98e-4 -> 1.96e-4 at step 500, 9.7e-5 -> 6.9e-5 at step 2500). stage1b.log.jsonl keeps the last
# record of each step.
aa-trt train --stage 1 --init runs4/stage0/model.safetensors --data data/synth128 --out runs4/stage1 --steps 8000 --batch 8 --lr 2e-4 --warmup 100 --lr-decay cosine --snapshot-every 500 --save-every 250 --log-every 10
aa-trt eval --ckpt runs4/stage1/snapshots/step_000500.safetensors --data data/synth128 --videos 6 --frames 24 --no-baselines -o eval_stage1b_step500.json
aa-trt train --stage 1 --init runs4/stage0/model.safetensors --data data/synth128 --out runs4/stage1 --steps 4500 --batch 8 --lr 2e-4 --warmup 100 --lr-decay cosine --snapshot-every 500 --save-every 250 --log-every 10 --resume
aa-trt train --stage 1 --init runs4/stage0/model.safetensors --data data/synth128 --out runs4/stage1 --steps 3800 --batch 8 --lr 2e-4 --warmup 100 --lr-decay cosine --snapshot-every 500 --save-every 250 --log-every 10 --resume
aa-trt train --stage 2 --init runs4/stage1/model.safetensors --data data/synth128 --out runs4/stage2 --frames 8 --batch 2 --steps 150 --lr 2e-4 --warmup 20 --lr-decay cosine --save-every 150 --log-every 10
python docs/training/ship.py runs4/stage2/model.safetensors aa_trt/assets/default.safetensors   # fp16 storage
aa-trt eval --ckpt aa_trt/assets/default.safetensors --data data/synth128 --videos 6 --frames 24 --ceiling -o eval_default.json
