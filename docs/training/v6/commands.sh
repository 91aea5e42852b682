# The embedded default model (v6), as it was made (2 shared CPU cores, torch 2.13 cpu). Wall times: README.md here. (Moved to docs/training/v6/ when v7 shipped; output paths below are relative to that folder.)
# v6 continues v5 on more data: first run v5's commands (v5/commands.sh, which starts from v4's, v3's and v2's);
# runs4/stage2/model.safetensors below is v3's stage-2 output in fp32 (the --init every stage-1 resume since v4
# keeps), runs6/ holds v5's outputs (runs6/dec: v5's decoder fine-tune, in fp32).
#
# More characters: a second synthetic set with seed 1 (all characters, backgrounds and dances new), and a
# training list mixing it with synth128's training videos (listed twice); its test splits are synth128's.
aa-trt data synth --out data/synth128s1 --seed 1 --videos 1280 --size 128 --frames 48 --format npz
python docs/training/make_mix.py   # data/mix128/train.json: 1536 entries, absolute paths
#
# Stage 1e: v5's stage-1d run resumed from its step-7500 state on the mix (a new --data is allowed on resume).
# LR back at 2e-4, held, then a cosine to 2e-5 over the last 700 steps. It ran over two sessions: started
# with --steps 11500, stopped at step 9000 (session end); resumed with --steps 13000, stopped at step 11000
# to fit the session; resumed with --steps 12600 (same --decay-steps), so the decay ran over 11900-12600.
mkdir -p runs7/stage1 && cp runs6/stage1/train_state.pt runs6/stage1/log.jsonl runs7/stage1/
aa-trt train --stage 1 --init runs4/stage2/model.safetensors --data data/mix128/train.json --out runs7/stage1 --steps 11500 --decay-steps 700 --batch 8 --lr 2e-4 --warmup 100 --lr-decay cosine --snapshot-every 1000 --save-every 250 --log-every 10 --resume
aa-trt train --stage 1 --init runs4/stage2/model.safetensors --data data/mix128/train.json --out runs7/stage1 --steps 13000 --decay-steps 700 --batch 8 --lr 2e-4 --warmup 100 --lr-decay cosine --snapshot-every 1000 --save-every 250 --log-every 10 --resume
aa-trt train --stage 1 --init runs4/stage2/model.safetensors --data data/mix128/train.json --out runs7/stage1 --steps 12600 --decay-steps 700 --batch 8 --lr 2e-4 --warmup 100 --lr-decay cosine --snapshot-every 1000 --save-every 250 --log-every 10 --resume
aa-trt train --stage 2 --init runs7/stage1/model.safetensors --data data/mix128/train.json --out runs7/stage2 --frames 8 --batch 2 --steps 150 --lr 2e-4 --warmup 20 --lr-decay cosine --save-every 150 --log-every 10
# The decoder: v5's fine-tuned decoder, unchanged (same encoder, so the same latents; v5 showed more decoder
# steps raise the ceiling but not the model's output).
python docs/training/graft_decoder.py runs7/stage2/model.safetensors runs6/dec/model.safetensors runs7/grafted.safetensors
# The CFG scale the model declares: a sweep on the *training* split (3 videos, 12 frames), best SSIM wins.
for g in 1.0 1.5; do
  aa-trt eval --ckpt runs7/grafted.safetensors --data data/synth128 --splits train --videos 3 --frames 12 --no-baselines --guidance $g -o cfg/v6_train_g$g.json
done
python docs/training/ship.py runs7/grafted.safetensors runs7/v6.safetensors --guidance 1.0   # fp16 storage
cp runs7/v6.safetensors aa_trt/assets/default.safetensors
aa-trt eval --ckpt runs7/v6.safetensors --data data/synth128 --videos 6 --frames 24 --ceiling -o eval_default.json
# The curve along stage 1e: curve/curve.sh. The sample picture:
aa-trt run examples/ref.png examples/dance.mp4 -o out.mp4 --seed 0
python docs/training/sample.py examples/ref.png examples/dance.mp4 out.mp4 docs/training/v6/sample_v6.png
