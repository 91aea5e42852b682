"""The training companion: synthetic data, stage 1 and stage 2 training, the distributed loop.

- synthetic.py (+ puppet.py, dance.py): `aa-trt data synth`, characters dancing with exact poses;
- data.py: reading a data set (Moore's meta JSON) into training batches;
- losses.py: v-prediction on the zero-SNR schedule, min-SNR weighting, offset noise;
- stage.py: what each stage trains and the training forward (the inference model classes);
- loop.py: `aa-trt train`, DistributedDataParallel, resumable state, export to an aa-trt checkpoint.
"""
