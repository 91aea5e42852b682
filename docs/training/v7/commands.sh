# The embedded default model (v7), as it was made (2 shared CPU cores, torch 2.13 cpu). Wall times: docs/training.md.
# v7 continues v6: first run v6's commands (v6/commands.sh, which starts from v5's, v4's, v3's and v2's).
# runs4/stage2/model.safetensors is v3's stage-2 output in fp32 (the --init every stage-1 resume since v4 keeps),
# runs7/ holds v6's outputs (runs7/stage1: its stage-1 state at step 12600; runs7/grafted.safetensors: v6 in fp32;
# runs7/dec: the decoder experiment of v6/next/, 1000 decoder-only steps on the mix).
#
# Still more characters: a third synthetic set (seed 2) and a training list with all three sets.
aa-trt data synth --out data/synth128s2 --seed 2 --videos 1280 --size 128 --frames 48 --format npz
python docs/training/make_mix.py data --extra synth128s1 synth128s2 --out mix128b   # 2560 entries, absolute paths
#
# The decoder, sharpened for SSIM: v6/next's decoder on the mix (runs7/dec), continued with (1 - SSIM) in the loss,
# first at weight 1, then at weight 3 (a new --seed each run, so new crops).
aa-trt train --stage 0 --init runs7/dec/model.safetensors --decoder-only --data data/mix128/train.json --out runs8/dec_ssim1 --steps 1000 --batch 16 --crop 32 --lr 1e-4 --seed 2 --ssim-weight 1.0 --log-every 50
aa-trt eval --ckpt runs8/dec_ssim1/model.safetensors --data data/synth128 --videos 6 --frames 24 --no-model --no-baselines --ceiling -o ceiling_decoder_b.json
aa-trt train --stage 0 --init runs8/dec_ssim1/model.safetensors --decoder-only --data data/mix128/train.json --out runs8/dec_ssim3 --steps 2000 --batch 16 --crop 32 --lr 1e-4 --seed 3 --ssim-weight 3.0 --log-every 50
aa-trt eval --ckpt runs8/dec_ssim3/model.safetensors --data data/synth128 --videos 6 --frames 24 --no-model --no-baselines --ceiling -o ceiling.json
#
# Stage 1f: v6's stage-1e run resumed from its step-12600 state on the new list; LR back at 2e-4, held to
# step 13700, then a cosine to 2e-5 at 14300.
mkdir -p runs8/stage1 && cp runs7/stage1/train_state.pt runs7/stage1/log.jsonl runs8/stage1/
aa-trt train --stage 1 --init runs4/stage2/model.safetensors --data data/mix128b/train.json --out runs8/stage1 --steps 14300 --decay-steps 600 --batch 8 --lr 2e-4 --warmup 100 --lr-decay cosine --snapshot-every 500 --save-every 250 --log-every 10 --resume
aa-trt train --stage 2 --init runs8/stage1/model.safetensors --data data/mix128b/train.json --out runs8/stage2 --frames 8 --batch 2 --steps 150 --lr 2e-4 --warmup 20 --lr-decay cosine --save-every 150 --log-every 10
# The decoder of runs8/dec_ssim3 onto the new checkpoint (same encoder, so the same latents).
python docs/training/graft_decoder.py runs8/stage2/model.safetensors runs8/dec_ssim3/model.safetensors runs8/grafted.safetensors
# The CFG scale the model declares: a sweep on the *training* split (3 videos, 12 frames), best SSIM wins.
for g in 1.0 1.5; do
  aa-trt eval --ckpt runs8/grafted.safetensors --data data/synth128 --splits train --videos 3 --frames 12 --no-baselines --guidance $g -o cfg/v7_train_g$g.json
done
python docs/training/ship.py runs8/grafted.safetensors runs8/v7.safetensors --guidance 1.0   # fp16 storage
cp runs8/v7.safetensors aa_trt/assets/default.safetensors
aa-trt eval --ckpt runs8/v7.safetensors --data data/synth128 --videos 6 --frames 24 --ceiling -o eval_default.json
# v6's networks with this decoder alone (fp32), for the table's "v6's networks with v7's decoder" row:
aa-trt eval --ckpt runs8/dec_ssim3/model.safetensors --data data/synth128 --videos 6 --frames 24 --guidance 1.0 -o eval_v6nets_v7decoder.json
# The curve along stage 1f: curve/curve.sh. Loss curves:
python -m aa_trt.training.curves --smooth=5 docs/training/stage1_2_loss.svg "v6 stage 1e (mix128)=docs/training/v6/stage1e.log.jsonl:loss" "v7 stage 1f (mix128b)=docs/training/stage1f.log.jsonl:loss" "v6 stage 2=docs/training/v6/stage2.log.jsonl:loss" "v7 stage 2=docs/training/stage2.log.jsonl:loss"
python -m aa_trt.training.curves --smooth=3 docs/training/decoder_ssim.svg "decoder b, weight 1=docs/training/decoder_ssim1.log.jsonl:ssim" "decoder c, weight 3=docs/training/decoder_ssim3.log.jsonl:ssim"
# The sample picture:
aa-trt run examples/ref.png examples/dance.mp4 -o out.mp4 --seed 0
python docs/training/sample.py examples/ref.png examples/dance.mp4 out.mp4 docs/training/sample_v7.png
#
# Tried after v7 shipped (docs/training/next/): v7's decoder continued 500 steps at the same pixels per step,
# 32x32 crops against 64x64 crops; then v7's networks with the 64x64-crop decoder.
aa-trt train --stage 0 --init runs8/dec_ssim3/model.safetensors --decoder-only --data data/mix128/train.json --out runs8/next_c32 --steps 500 --batch 16 --crop 32 --lr 1e-4 --seed 4 --ssim-weight 3 --log-every 50
aa-trt train --stage 0 --init runs8/dec_ssim3/model.safetensors --decoder-only --data data/mix128/train.json --out runs8/next_c64 --steps 500 --batch 4 --crop 64 --lr 1e-4 --seed 4 --ssim-weight 3 --log-every 50
for c in 32 64; do
  aa-trt eval --ckpt runs8/next_c$c/model.safetensors --data data/synth128 --videos 6 --frames 24 --no-model --no-baselines --ceiling -o next/ceiling_crop$c.json
done
python docs/training/graft_decoder.py runs8/stage2/model.safetensors runs8/next_c64/model.safetensors runs8/grafted_c64.safetensors
aa-trt eval --ckpt runs8/grafted_c64.safetensors --data data/synth128 --videos 6 --frames 24 --guidance 1.0 --no-baselines -o next/eval_v7_crop64decoder_g1.0.json
