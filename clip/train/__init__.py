"""Contrastive training: launcher-agnostic process setup, the resumable shard stream, wrappers, the loop and
checkpoints (docs/formats.md "Checkpoints"). Entry point: `python -m pipelines.train` (or `clip-pipeline train`);
the library call, in one process or on every rank under torchrun / srun:

    from clip.train import stage
    result = stage.run(cfg.train, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking,
                       progress=progress, debug=cfg.debug)   # -> TrainResult

Modules, one job each:
- stage: `run`, the loop that ties the others together (forward, backward, step);
- prepare: everything before the first step (`prepare_run` -> `PreparedRun`);
- steplog: the loop's device-side sums, metrics every `train.log_every` steps, curves, progress, final figures;
- checkpointer: when a step checkpoint is written (schedule, non-finite streaks, stop signals), final.pt;
- schedule: stream count, chunk and step counts (`plan_schedule`), the warm-up/cosine LR factor;
- resume: pick the checkpoint to continue from, check it belongs to this run, build and restore the state;
- state: the training state and its checkpoint dict (plain / DDP / FSDP2 state dicts), the global data position;
- step: one step (forward, loss, non-finite guard, backward, optimizer), inputs to the device;
- streams: the manifest's samples as deterministic, resumable logical streams (the data design);
- shard_reader: verified reads of the shards (every byte checked against the published version);
- loader: a rank's per-step batches from its streams (DataLoader workers);
- gpu_decode: JPEG decoding on the GPU (`train.gpu_decode`);
- tokenizer_setup: the run's tokenizer (from the checkpoint, CLIP's BPE, or learnt by rank 0);
- report: the log window, loss curves, metrics.json, MLflow artifacts, `TrainResult`;
- debug: the `debug` section's hooks (keys log, injected NaN losses, step delay);
- stop: SIGUSR1 / SIGTERM -> a step checkpoint, then `TrainingStopped` (a scheduler's time limit or requeue);
- distributed (env -> process group), wrap (checkpointing -> DDP/FSDP2 -> compile, in that order),
  checkpoint (checkpoints on clip.storage).
"""
