# The embedded default model (v4), as it was made (2 shared CPU cores, torch 2.13 cpu). Wall times: docs/training.md.
# v4 continues v3: first run v3's commands (v3/commands.sh, which starts from v2's: v2/commands.sh);
# runs4/stage2/model.safetensors below is v3's stage-2 output in fp32.
#
# Stage 1c: v3's UNets trained on at a held LR. Started as a cosine over 12000 steps (LR >= 0.98 x 2e-4
# until step 1000); resumed from the step-500 state with --steps 3500 --decay-steps 700, then from the
# step-1000 state with --steps 3200 --decay-steps 700 (time): LR 2e-4 held to step 2500, cosine to 2e-5
# at 3200. (A first start the day before stopped at step 50 with the session and was discarded.)
# stage1c.log.jsonl keeps the last record of each step.
aa-trt train --stage 1 --init runs4/stage2/model.safetensors --data data/synth128 --out runs5/stage1 --steps 12000 --batch 8 --lr 2e-4 --warmup 100 --lr-decay cosine --snapshot-every 1000 --save-every 250 --log-every 10
aa-trt train --stage 1 --init runs4/stage2/model.safetensors --data data/synth128 --out runs5/stage1 --steps 3500 --decay-steps 700 --batch 8 --lr 2e-4 --warmup 100 --lr-decay cosine --snapshot-every 1000 --save-every 250 --log-every 10 --resume
aa-trt train --stage 1 --init runs4/stage2/model.safetensors --data data/synth128 --out runs5/stage1 --steps 3200 --decay-steps 700 --batch 8 --lr 2e-4 --warmup 100 --lr-decay cosine --snapshot-every 1000 --save-every 250 --log-every 10 --resume
aa-trt train --stage 2 --init runs5/stage1/model.safetensors --data data/synth128 --out runs5/stage2 --frames 8 --batch 2 --steps 150 --lr 2e-4 --warmup 20 --lr-decay cosine --save-every 150 --log-every 10
# The VAE decoder alone, on the frozen encoder's latents (the UNets and latent_scale stay valid).
aa-trt train --stage 0 --init runs5/stage2/model.safetensors --decoder-only --data data/synth128 --out runs5/dec --steps 800 --batch 16 --crop 32 --lr 2e-4 --log-every 20
aa-trt eval --ckpt runs5/stage2/model.safetensors --data data/synth128 --videos 6 --frames 24 --no-model --no-baselines --ceiling -o ceiling_stage2.json
aa-trt eval --ckpt runs5/dec/model.safetensors --data data/synth128 --videos 6 --frames 24 --no-model --no-baselines --ceiling -o ceiling_dec.json
# The CFG scale the model declares: a sweep on the *training* split (3 videos, 12 frames), best SSIM wins.
for g in 1.0 1.5 2.0 2.5 3.5; do
  aa-trt eval --ckpt runs5/dec/model.safetensors --data data/synth128 --splits train --videos 3 --frames 12 --no-baselines --guidance $g -o cfg/v4dec_train_g$g.json
done
aa-trt eval --ckpt runs5/stage2/model.safetensors --data data/synth128 --splits train --videos 3 --frames 12 --no-baselines --guidance 1.5 -o cfg/v4nodec_train_g1.5.json
python docs/training/ship.py runs5/dec/model.safetensors aa_trt/assets/default.safetensors --guidance 1.0   # fp16 storage
aa-trt eval --ckpt aa_trt/assets/default.safetensors --data data/synth128 --videos 6 --frames 24 --ceiling -o eval_default.json
aa-trt eval --ckpt aa_trt/assets/default.safetensors --data data/synth128 --videos 6 --frames 24 --guidance 3.5 --no-baselines -o eval_default_cfg3.5.json
