"""Drop one optimizer update (the spike monitor's `skip`) at every ZeRO stage and precision.

Contract of skip_update(engine), called at the accumulation boundary instead of engine.step():
- parameters (the low-precision copies and the fp32 masters) and the optimizer state (Adam's
  moments and step counts) stay bit-identical;
- the accumulated gradient, NaN/inf included, is discarded from every buffer the DeepSpeed
  optimizer keeps it in, so none of it reaches a later step;
- DeepSpeed's counters (engine.global_steps, global_samples, micro_steps; skipped_steps counts
  the skip) and the LR scheduler advance exactly as for a taken step: the harness's LR
  schedule is tied to its step count;
- nothing proportional to the optimizer state is copied or allocated: the optimizer's step is
  never called, so Adam's moments are never touched.

Each DeepSpeed optimizer's discard follows the path its own step() takes on an overflow or an
invalid gradient norm (DeepSpeed's own "drop this update"), minus the loss-scale update (a
skip is not an overflow: under fp16 the scale is left as it is). An fp16 overflow step never
comes here: the trainer hands it to engine.step() even when the monitor asked for a skip, so
that DeepSpeed drops the update AND lowers the scale (skipped here, the same overflow would
come back every step at the same scale). A few buffers
DeepSpeed would only overwrite are zeroed as well, so that a parameter without a gradient on
the next step cannot pick up a stale NaN. fp16 cannot run on the CPU accelerator: the fp16
optimizers' path is read from DeepSpeed 0.19.8's source and untested here. NVMe optimizer
swapping and unmanaged gradient accumulation are refused (the harness uses neither).
"""
from __future__ import annotations


def skip_update(engine) -> None:
    assert engine.is_gradient_accumulation_boundary(), "skip_update replaces the boundary step()"
    assert engine.managed_gradient_accumulation(), "the counters below assume DeepSpeed's own"
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        _discard_zero3(opt)
    elif isinstance(opt, DeepSpeedZeroOptimizer):
        _discard_zero12(opt)
    else:
        # torch's AdamW (ZeRO 0 fp32): p.grad. FP16_Optimizer / FP16_UnfusedOptimizer (ZeRO 0
        # bf16 or fp16): p.grad; their fp32 master gradients exist only inside step().
        # BF16_Optimizer (ZeRO 1 bf16): p.grad plus the fp32 accumulation buffer, which its
        # zero_grad clears too (clear_lp_grads + clear_hp_grads, as on an invalid norm).
        opt.zero_grad(set_to_none=True)
    _advance_as_taken(engine)


def _discard_zero12(opt) -> None:
    """DeepSpeedZeroOptimizer.step()'s overflow path (ZeRO 1, 2, with or without offload)."""
    opt.micro_step_id = -1  # INITIAL_MICRO_STEP_ID, as step() sets it: offload copies, not adds
    opt._wait_for_offload_copies()
    opt.zero_grad(set_to_none=True)  # p.grad and p.grad_accum
    opt._release_preflattened_grad_buffers()
    # the flat fp32 partitions (ZeRO 1/2; the compact buffer that bf16 accumulates into in fp32
    # is kept and added to across micro-steps while present). Set to None, not a new dict:
    # the _hp_mapping of each parameter holds this dict.
    for k in opt.averaged_gradients:
        opt.averaged_gradients[k] = None
    for k in opt.all_grad_tensors:
        opt.all_grad_tensors[k] = None
    if opt.cpu_offload:
        opt._offload_accumulated_param_ids = set()
        opt.reset_cpu_buffers()  # per-parameter norms, the overflow flag
        # the CPU fp32 gradient the offloaded step reads whole; DeepSpeed overwrites only the
        # slices of parameters that get a gradient next step, so clear the rest too
        for fp32 in opt.single_partition_of_fp32_groups:
            if fp32.grad is not None:
                fp32.grad.zero_()


def _discard_zero3(opt) -> None:
    """DeepSpeedZeroOptimizer_Stage3.step()'s start and overflow path (_overflow_clean_up)."""
    if opt.swap_optimizer:
        raise NotImplementedError("skip_update: NVMe optimizer swapping is not supported")
    opt._pre_step()  # micro_step_id = 0: the next micro-batch copies into the buffers, not adds
    opt._partition_all_parameters()  # step() releases gathered parameters first, skip or not
    opt.zero_grad(set_to_none=True)
    opt.averaged_gradients.clear()  # views into grad_partitions_flat_buffer
    # the flat buffer holding every partition's accumulated gradient: DeepSpeed overwrites only
    # the parameters that get a gradient next step, and checks the whole buffer for inf/NaN
    opt.grad_partitions_flat_buffer.zero_()
    if opt.offload_optimizer:
        opt.reset_cpu_buffers()  # per-parameter norms
        for fp32 in opt.fp32_partitioned_groups_flat:  # the CPU fp32 gradients, same reason
            if fp32.grad is not None:
                fp32.grad.zero_()


def _advance_as_taken(engine) -> None:
    """What engine.step() does at a boundary besides the update (_take_model_step and after),
    with managed gradient accumulation (the harness's): the scheduler steps as if applied."""
    engine._step_applied = False
    engine.skipped_steps += 1
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.step()
    engine.losses = None
    engine.global_steps += 1
    engine.global_samples += engine.train_batch_size()
    engine.tput_timer.stop(global_step=True, report_speed=False)
    engine.micro_steps += 1
