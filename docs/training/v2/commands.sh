# The second default model (v2), as it was made (2 shared CPU cores, torch 2.13 cpu). Wall times: docs/training/v2/README.md.
# The first default model (v1, 4 latent channels) and its record: docs/training/v1/.
aa-trt data synth --out data/synth128 --videos 320 --size 128 --frames 48 --seed 0 --format npz,mp4
aa-trt train --stage 0 --preset small --data data/synth128 --out runs/stage0 --steps 2500 --batch 8 --lr 4e-4 --log-every 20
aa-trt eval --ckpt runs/stage0/model.safetensors --data data/synth128 --videos 6 --frames 24 --ceiling --no-model -o runs/eval_stage0_ceiling.json
aa-trt train --stage 1 --init runs/stage0/model.safetensors --data data/synth128 --out runs/stage1 --steps 3000 --batch 8 --lr 3e-4 --warmup 100 --lr-decay cosine --snapshot-every 500 --save-every 250 --log-every 10
aa-trt train --stage 2 --init runs/stage1/model.safetensors --data data/synth128 --out runs/stage2 --frames 8 --batch 2 --steps 150 --lr 2e-4 --warmup 20 --lr-decay cosine --save-every 150 --log-every 10
python docs/training/ship.py runs/stage2/model.safetensors aa_trt/assets/default.safetensors   # fp16 storage
aa-trt eval --ckpt aa_trt/assets/default.safetensors --data data/synth128 --videos 6 --frames 24 --ceiling -o eval_default.json
python examples/make_examples.py data/synth128
aa-trt eval --ckpt aa_trt/assets/default.safetensors --data data/synth128 --videos 6 --frames 24 --guidance 1.5 --no-baselines -o eval_default_cfg1.5.json
