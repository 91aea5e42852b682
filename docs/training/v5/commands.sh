# The embedded default model (v5), as it was made (2 shared CPU cores, torch 2.13 cpu). Wall times: docs/training.md.
# v5 continues v4: first run v4's commands (v4/commands.sh, which starts from v3's and v2's);
# runs4/stage2/model.safetensors below is v3's stage-2 output in fp32, the --init of v4's stage 1c,
# and runs5/ holds v4's outputs (runs5/dec: v4's decoder fine-tune, in fp32).
#
# Stage 1d: v4's stage-1c run resumed from its step-3200 state with a larger --steps: the LR climbs
# straight back to 2e-4 (no second warm-up), is held to step 6800 and decays to 2e-5 at 7500.
# It ran over two sessions: started with --steps 6400, stopped at step 4250 (session end), resumed
# with --steps 7500 (same --decay-steps), which moved the decay. stage1d.log.jsonl keeps steps 3210-7500.
mkdir -p runs6/stage1 && cp runs5/stage1/train_state.pt runs5/stage1/log.jsonl runs6/stage1/
aa-trt train --stage 1 --init runs4/stage2/model.safetensors --data data/synth128 --out runs6/stage1 --steps 6400 --decay-steps 700 --batch 8 --lr 2e-4 --warmup 100 --lr-decay cosine --snapshot-every 1000 --save-every 250 --log-every 10 --resume
aa-trt train --stage 1 --init runs4/stage2/model.safetensors --data data/synth128 --out runs6/stage1 --steps 7500 --decay-steps 700 --batch 8 --lr 2e-4 --warmup 100 --lr-decay cosine --snapshot-every 1000 --save-every 250 --log-every 10 --resume
aa-trt train --stage 2 --init runs6/stage1/model.safetensors --data data/synth128 --out runs6/stage2 --frames 8 --batch 2 --steps 150 --lr 2e-4 --warmup 20 --lr-decay cosine --save-every 150 --log-every 10
# The decoder: v4's fine-tuned decoder moved onto the new UNets (same encoder, so the same latents),
# then fine-tuned 1000 steps more on the frozen encoder's latents.
python docs/training/graft_decoder.py runs6/stage2/model.safetensors runs5/dec/model.safetensors runs6/grafted.safetensors
aa-trt train --stage 0 --init runs6/grafted.safetensors --decoder-only --data data/synth128 --out runs6/dec --steps 1000 --batch 16 --crop 32 --lr 1e-4 --log-every 20
aa-trt eval --ckpt runs6/dec/model.safetensors --data data/synth128 --videos 6 --frames 24 --no-model --no-baselines --ceiling -o ceiling_dec.json
# The CFG scale the model declares: a sweep on the *training* split (3 videos, 12 frames), best SSIM wins.
for g in 1.0 1.5 2.0; do
  aa-trt eval --ckpt runs6/dec/model.safetensors --data data/synth128 --splits train --videos 3 --frames 12 --no-baselines --guidance $g -o cfg/v5_train_g$g.json
done
python docs/training/ship.py runs6/dec/model.safetensors runs6/v5.safetensors --guidance 1.0   # fp16 storage
cp runs6/v5.safetensors aa_trt/assets/default.safetensors
aa-trt eval --ckpt runs6/v5.safetensors --data data/synth128 --videos 6 --frames 24 --ceiling -o eval_default.json
# Where the gain came from: v5's UNets with v4's decoder (the graft above), the model alone.
aa-trt eval --ckpt runs6/grafted.safetensors --data data/synth128 --videos 6 --frames 24 --guidance 1.0 --no-baselines -o eval_v5unets_v4decoder.json
# The curve along stage 1d: curve/curve.sh. The sample picture:
aa-trt run examples/ref.png examples/dance.mp4 -o out.mp4 --seed 0
python docs/training/sample.py examples/ref.png examples/dance.mp4 out.mp4 docs/training/sample_v5.png
