"""How it learns: the objective, the loop, the optimizer, and everything a run writes.

    bf16_update.py    bf16 weights without an fp32 master: compensated updates (bf16 weight + int16 remainder)
    budget.py         the start-up budget: what a step, an epoch and a preview will need, checked first
    distributed.py    data-parallel training over processes started by `accelerate launch` / `torchrun`
    ema.py            the EMA of the trained weights (`ema_decay`): update, swap for saves and previews, state
    events.py         the run's event log and the resolved-config file
    file_metadata.py  the metadata of every saved network file (kohya's ss_* keys, modelspec)
    finetune_memory.py bytes per trained parameter per memory lever and a fine-tune step's predicted peak
    finetune_plan.py  a fine-tune's memory levers: block swap (trained blocks with the fused pass), fp8 of frozen
                      Linears, its
                      vram_budget_gb plan
    fsdp.py           sharded fine-tuning of the DiT with FSDP2 (`fully_shard` per block), DCP save/resume
    flow.py           rectified-flow maths and the objective: timestep sampling, noise options, `training_step`,
                      per-sample noise seeds (noising and the loss: models/flow_maths.py)
    fused_backward.py the optimizer split per parameter, stepped during backward (kohya's fused_backward_pass)
    grad_sync.py      the data-parallel gradient average: buckets all-reduced while the backward runs
    inputs.py         what a step consumes: captions → DiT context, cached latents
    lock.py           one run per output_dir / output_name
    loop.py           the training loop (`run_training`, `train`)
    memory_estimate.py one step's peak memory for given settings (calibrated on H200 measurements)
    measurements.py   measurements during the run: when validation and the light evaluation metrics
                      (eval_every_n_*) run, in eval mode outside step time, and what they log
    model_setup.py    the frozen base models loaded and the DiT prepared with its network and speed levers
    monitor.py        per-step metrics and alerts without a host-device sync on unlogged steps
    optim.py          optimizers by kohya's `--optimizer_type` names; `check_optimization`, the start-up check of
                      the optimizer and schedule settings that need their classes
    optimizer_levers.py a fine-tune's optimizer-side memory levers: which are on, their start-up rules, the optimizer
    optimizer_offload.py the optimizer state in host memory (`optimizer_offload`), stepped there
    resume.py         whether and how a run resumes: the state folder, the settings that must not change
    save_plan.py      where network files and states go: kohya's names, retention, no clobbering
    saving.py         what the loop writes to keep work safe, and when: network files and states
    schedulers.py     learning-rate schedules by kohya's `--lr_scheduler` names
    sharded_run.py    a fine-tune sharded with FSDP2 in the real run: when, what is refused, sharded saves/resume
    setup.py          the start of a run shared by train, cache and the benchmarks: optimizer/schedule check,
                      seed, tokenizers, dataset, run plan, optimizer
    step_time.py      a step's expected time per memory setting (an H200 cost model; FLOPs of a step)
    tracking.py       TensorBoard / wandb
    training_state.py training-state folders for an exact resume: written atomically, read with checks
    validation.py     validation loss on the held-out images
    vram_plan.py      `vram_budget_gb`: the fastest memory settings that fit
"""
