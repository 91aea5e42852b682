# The embedded default model, as it was made (2 shared CPU cores, torch 2.13 cpu). Wall times: docs/training.md.
aa-trt data synth --out data/synth128 --videos 320 --size 128 --frames 48 --seed 0 --format npz,mp4
# stage 0, first attempt with 16 norm groups in the VAE (grey reconstructions, abandoned): not repeated here
aa-trt train --stage 0 --preset small --data data/synth128 --out runs/stage0 --steps 1500 --batch 8 --log-every 20
aa-trt train --stage 0 --init runs/stage0/model.safetensors --data data/synth128 --out runs/stage0b --steps 1000 --batch 8 --lr 5e-4 --log-every 20
aa-trt train --stage 1 --init runs/stage0b/model.safetensors --data data/synth128 --out runs/stage1 --steps 3000 --batch 8 --lr 2e-4 --warmup 100 --snapshot-every 200 --save-every 200 --log-every 10
# stage 1 stopped by hand after step 1610 (time budget); stage 2 starts from its step-1600 snapshot
aa-trt train --stage 2 --init runs/stage1/snapshots/step_001600.safetensors --data data/synth128 --out runs/stage2 --frames 8 --batch 2 --steps 200 --lr 2e-4 --warmup 20 --snapshot-every 100 --save-every 100 --log-every 10
python docs/training/ship.py runs/stage2/model.safetensors aa_trt/assets/default.safetensors   # fp16 storage
aa-trt eval --ckpt aa_trt/assets/default.safetensors --data data/synth128 --videos 6 --frames 24 --ceiling -o eval_default.json
python examples/make_examples.py data/synth128
